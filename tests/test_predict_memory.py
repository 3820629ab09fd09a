"""Memory follows the input in `costmodel predict`: steps are padded to one common width only while that
costs little; otherwise they are evaluated in width classes (no step padded beyond 4x its requests), with
the same predictions."""
import numpy as np

from costmodel.apps import records as R

_classes = R.width_classes


def test_width_classes_pad_each_step_at_most_four_times():
    w = np.array([[0, 1], [0, 3], [1, 5], [0, 100000], [2, 0], [3, 17]])
    seen = []
    for (p, d), idx in R.width_classes(w):
        for i in idx:
            assert w[i, 0] <= p <= max(1, 4 * w[i, 0]) and w[i, 1] <= d <= max(1, 4 * w[i, 1])
            seen.append(int(i))
    assert sorted(seen) == list(range(len(w)))


def test_width_classes_give_the_common_width_predictions(monkeypatch, predictor):
    steps = [{"decode": [300, 900]}, {"prefill": [[64, 100]], "decode": [500 + 10 * i for i in range(9)]}]
    recs = [R.parse_record({"id": f"r{i}", "model": "llama-3.1-8b", "gpu": "H100", "tp": 1, "steps": [s]}, f"t:{i}")
            for i, s in enumerate(steps)]
    common, _ = predictor.predict(recs)
    monkeypatch.setattr(R, "PAD_BUDGET", -10**12)  # padding to the widest step now always exceeds the budget
    calls = []
    monkeypatch.setattr(R, "width_classes", lambda w: calls.append(len(w)) or _classes(w))
    classes, _ = predictor.predict(recs)
    assert calls == [2]
    np.testing.assert_allclose(classes, common, rtol=1e-6)
