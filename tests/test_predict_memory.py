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


def test_a_step_whose_kv_cache_cannot_fit_is_warned(tmp_path, capsys):
    """Llama-3.1-70B at TP 4 on H100 keeps about 30,000 tokens of KV cache per GPU set (docs/memory.md):
    64 decodes of 8,000 tokens (512,000) cannot be held at once, 8 of 1,000 can."""
    import json
    from costmodel.cli import main
    recs = [{"id": "fits", "model": "llama-3.1-70b", "gpu": "H100", "tp": 4, "steps": [{"decode": [1000] * 8}]},
            {"id": "too-big", "model": "llama-3.1-70b", "gpu": "H100", "tp": 4, "steps": [{"decode": [8000] * 64}]}]
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["predict", str(f), "--calibration", "none"]) == 0
    err = capsys.readouterr().err
    assert "1 record(s) hold more KV cache in one step" in err and f"{f}:2" in err and f"{f}:1 " not in err
