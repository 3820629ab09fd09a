"""The sampler's top-k/top-p filter: which parameters pick it, where they come from (a record's ``sampling``,
the checkpoint's generation_config.json), and its bytes and kernels, checked by hand."""
import json
import shutil

import pytest

from costmodel import InputError, ops
from costmodel.apps.records import Predictor, parse_record
from costmodel.model import default_model_configs_dir, load_model
from costmodel.params import Params
from costmodel.sampling import Sampling, merged, parse, parse_option

V = 128256  # llama-3.1-8b's vocabulary


def test_filter_follows_vllm_parameters():
    assert Sampling().filter(V) == "none"  # vLLM's defaults: a plain softmax sample
    assert Sampling(top_p=0.9).filter(V) == "top_p"
    assert Sampling(top_p=0.95, top_k=20).filter(V) == "top_p"  # top-k with top-p still sorts
    assert Sampling(top_k=20).filter(V) == "top_k"
    assert Sampling(top_k=-1).filter(V) == Sampling(top_k=V).filter(V) == "none"  # off, or the whole vocabulary
    assert Sampling(temperature=0.0, top_p=0.9).filter(V) == "none"  # greedy: argmax, no filter


def test_record_parameters_override_the_generation_config_key_by_key():
    defaults = (("temperature", 0.6), ("top_p", 0.9))
    assert merged(defaults, None) == Sampling(0.6, 0.9, 0)
    assert merged(defaults, {"top_p": 1.0}).filter(V) == "none"
    assert merged(defaults, {"temperature": 0.0}).filter(V) == "none"
    assert merged(defaults, {"top_k": 50}) == Sampling(0.6, 0.9, 50)


@pytest.mark.parametrize("obj, msg", [
    ([0.9], r"field 'sampling': must be an object"),
    ({"top_p": 0.9, "min_p": 0.1}, r"field 'sampling': unknown key\(s\) min_p"),
    ({"top_p": 0.0}, r"field 'sampling.top_p': must be in \(0, 1\]"),
    ({"top_p": "0.9"}, r"field 'sampling.top_p': must be a number"),
    ({"top_k": 2.5}, r"field 'sampling.top_k': must be an integer >= -1"),
    ({"temperature": -1}, r"field 'sampling.temperature': must be >= 0"),
    ({"temperature": float("nan")}, r"field 'sampling.temperature': must be a number"),
])
def test_bad_sampling_is_refused_naming_the_field(obj, msg):
    with pytest.raises(InputError, match=r"^r.jsonl:2: " + msg):
        parse(obj, "r.jsonl:2")


def _model_dir(tmp_path, generation):
    d = tmp_path / "m"
    shutil.copytree(default_model_configs_dir() / "llama-3.1-8b", d)
    if generation is not None:
        (d / "generation_config.json").write_text(json.dumps(generation))
    return d


def test_generation_config_gives_the_defaults(tmp_path):
    d = _model_dir(tmp_path, {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9})
    assert dict(load_model(str(d)).sampling_defaults) == {"temperature": 0.6, "top_p": 0.9}
    assert load_model("llama-3.1-8b").sampling_defaults is None  # the packaged configs have no generation config
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    assert load_model(str(d)).sampling_defaults == ()  # a generation config that sets no sampling
    (d / "generation_config.json").write_text("[1]")
    with pytest.raises(InputError, match=r"generation_config.json: a generation config must be a JSON object"):
        load_model(str(d))
    (d / "generation_config.json").write_text(json.dumps({"top_p": 2}))
    with pytest.raises(InputError, match=r"generation_config.json: field 'generation_config.top_p'"):
        load_model(str(d))


def test_filter_bytes_by_hand():
    d = ops.dims(load_model("llama-3.1-8b"), 2)._replace(filter_bytes=ops.sampler_filter("top_p")[0])
    # top-p: 3 fp32 passes (12 bytes) + the sort-based filter's 214 bytes per entry of the full (all-gathered)
    # vocabulary, for each of 8 sampled requests
    assert float(ops.sampling_bytes(d, 8.0)) == (12 + 214) * 8 * V
    assert ops.sampler_filter("top_k") == (30.0, 6.0) and ops.sampler_filter("none") == (0.0, 0.0)


def test_a_steps_sampler_time_by_hand(tmp_path):
    base = {"id": "a", "model": "llama-3.1-8b", "gpu": "H100", "tp": 1, "steps": [{"decode": [2000] * 8}]}
    recs = [parse_record(base, "r.jsonl:1"),
            parse_record({**base, "id": "b", "sampling": {"top_p": 0.9}}, "r.jsonl:2"),
            parse_record({**base, "id": "c", "sampling": {"top_k": 20}}, "r.jsonl:3"),
            parse_record({**base, "id": "d", "sampling": {"top_p": 0.9, "temperature": 0}}, "r.jsonl:4"),
            parse_record({**base, "id": "e", "model": str(_model_dir(tmp_path, {"top_p": 0.9}))}, "r.jsonl:5")]
    p = Params()
    total, parts = Predictor().predict(recs, p)
    head = parts["lm_head_sampling"]
    bw = 3350e9 * p.hbm_efficiency  # H100-SXM's HBM at the default efficiency, bytes/s
    assert head[1] - head[0] == pytest.approx(214 * 8 * V / bw * 1e6 + 18 * p.kernel_floor_us, rel=1e-4)
    assert head[2] - head[0] == pytest.approx(30 * 8 * V / bw * 1e6 + 6 * p.kernel_floor_us, rel=1e-4)
    assert head[3] == head[0]  # greedy
    assert head[4] == pytest.approx(head[1], rel=1e-6)  # the same filter from the model's generation_config.json
    assert total[1] - total[0] == pytest.approx(head[1] - head[0], rel=1e-4)  # nothing else moves


def test_predict_says_which_records_sample_with_a_filter(tmp_path, capsys):
    from costmodel.cli import main
    rec = {"id": "a", "model": "llama-3.1-8b", "gpu": "H100", "tp": 1, "steps": [{"decode": [100] * 2}]}
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (rec, dict(rec, id="b", sampling={"top_p": 0.9}))) + "\n")
    assert main(["predict", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "sampler: 1 records sample with a top-k/top-p filter" in out and "unknown" not in err
    # --sampling fills what a record leaves out: both records then sample with top-p
    assert main(["predict", str(path), "--sampling", "top_p=0.95"]) == 0
    assert "sampler: 2 records sample" in capsys.readouterr().out


def test_command_line_option():
    assert parse_option("top_p=0.95,top_k=20, temperature=0.6") == {"top_p": 0.95, "top_k": 20, "temperature": 0.6}
    import argparse
    for bad, msg in (("foo", "KEY=VALUE pairs"), ("top_p=2", "field 'top_p': must be in"), ("min_p=0.1", "min_p")):
        with pytest.raises(argparse.ArgumentTypeError, match=msg):
            parse_option(bad)


def test_serving_option_fills_what_the_record_leaves_out():
    from costmodel.apps import serve as sv
    rec = {"id": "a", "model": "llama-2-7b", "gpu": "H100", "tp": 1,
           "workload": {"type": "closed", "concurrency": 4, "input_tokens": 100, "output_tokens": 8}}
    for given, record, want in (({"top_p": 0.9}, None, (("top_p", 0.9),)),
                                ({"top_p": 0.9, "top_k": 5}, {"top_k": 20}, (("top_k", 20), ("top_p", 0.9))),
                                (None, {"temperature": 0.0}, (("temperature", 0.0),))):
        r = dict(rec, sampling=record) if record else rec
        assert sv.resolve(r, "r:1", workload_options={"sampling": given}).sampling == want


def test_every_command_that_prices_records_takes_sampling(tmp_path, capsys):
    from costmodel.cli import build_parser, main
    p = build_parser()
    for argv in (["predict", "r.jsonl"], ["fit", "r.jsonl", "--out", "c.json"],
                 ["serve", "r.jsonl"], ["fit-serving", "r.jsonl", "--out", "c.json"], ["regret", "r.jsonl"],
                 ["search", "--model", "llama-3.1-8b", "--gpu", "H100", "--gpus", "1", "--isl", "8", "--osl", "8"]):
        assert p.parse_args(argv).sampling is None
        assert p.parse_args(argv + ["--sampling", "top_p=0.9"]).sampling == {"top_p": 0.9}
    # regret with --predictions predicts nothing itself: --sampling is refused there, not ignored
    rec, pred = tmp_path / "r.jsonl", tmp_path / "p.jsonl"
    rec.write_text("")
    pred.write_text("")
    assert main(["regret", str(rec), "--predictions", str(pred), "--sampling", "top_p=0.9"]) != 0
    assert "sampling" in capsys.readouterr().err


def test_search_prices_and_reports_the_sampling_it_was_given():
    from costmodel.apps import search as sr
    kw = dict(isl=256, osl=32, tpot_ms=50.0, concurrency=[8], disagg=False)
    plain = sr.search("llama-3.1-8b", "H100", 1, **kw)
    top_p = sr.search("llama-3.1-8b", "H100", 1, workload_options={"sampling": {"top_p": 0.9}}, **kw)
    assert top_p.query["sampling"] == {"top_p": 0.9} and plain.query["sampling"] is None
    a, b = plain.rows[0], top_p.rows[0]
    assert b["tpot_mean_ms"] > a["tpot_mean_ms"]
    assert sr.vllm_command(top_p, b).endswith("""--override-generation-config '{"top_p":0.9}'""")
    assert "override-generation-config" not in sr.vllm_command(plain, a)
