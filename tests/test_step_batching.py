"""A step's time must not depend on which other steps share its batch (a large vmap once got this wrong)."""
import numpy as np

from costmodel.params import Params
from costmodel.apps.records import Predictor, Record


def test_same_time_alone_and_in_a_large_mixed_batch():
    pred = Predictor()
    probe = Record("probe", "llama-2-7b", "H100", 1, [{"prefill": [[1325, 0]], "decode": []}], "probe")
    filler = Record("filler", "llama-2-7b", "H100", 1,
                    [{"prefill": [], "decode": [1000 + i]} for i in range(9000)], "filler")
    alone, _ = pred.predict([probe], Params())
    batched, _ = pred.predict([filler, probe], Params())
    np.testing.assert_allclose(batched[1], alone[0], rtol=1e-5)
    one_step, _ = pred.predict([Record("f1", "llama-2-7b", "H100", 1, [filler.steps[-1]], "f1")], Params())
    last_alone = float(one_step[0])
    assert batched[0] > 9000 * 0.5 * last_alone  # sum of 9000 decode steps, each about as long
