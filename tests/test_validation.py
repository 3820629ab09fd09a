"""Bad input is refused with one line naming file[:line] and field (exit 2, nothing written); input that is
priced but implausible gets a one-line warning; valid input is priced as before.

Most cases run on small synthetic tables (`bench`), so that loading them is instant and the step model
compiles once for all of them."""
import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from costmodel import ops
from costmodel.apps.kernel_calls import predict_kernel_csv
from costmodel.apps.records import Predictor, parse_record, read_records
from costmodel.cli import main
from costmodel.errors import InputError, InputWarning
from costmodel.hardware import get_gpu
from costmodel.interp import OUTLIER_FACTOR, low_outliers, suffix_min
from costmodel.model import ModelConfig, load_model, quantized_weight_dtype
from costmodel.step import MAX_TOKENS, pack_steps, validate_step
from costmodel.tables import Adjustments, load_gemm, load_tables

H100 = get_gpu("H100")
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
         "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}


# ---------------------------------------------------------------- helpers

def cli(capsys, *args):
    """Run the CLI in-process: (exit code, stdout, stderr lines)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


def one_error(capsys, args, *needles):
    """The command exits 2 with exactly one stderr line, `costmodel: error: ...`, holding every needle."""
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and err[0].startswith("costmodel: error: "), err
    for n in needles:
        assert str(n) in err[0], (n, err[0])
    return err[0]


def record(**kw):
    r = {"id": "a", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"prefill": [[512, 0]], "decode": [100]}]}
    r.update(kw)
    return r


def write_records(path, *recs, raw=None):
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def write_config(root, name="m", cfg=None, raw=None, **overrides):
    """A config folder ``root/name/config.json``: LLAMA with ``overrides`` (None deletes a key)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    if raw is not None:
        (d / "config.json").write_bytes(raw)
    else:
        c = dict(LLAMA if cfg is None else cfg)
        for k, v in overrides.items():
            if v is ... and k in c:
                del c[k]
            elif v is not ...:
                c[k] = v
        (d / "config.json").write_text(json.dumps(c))
    return d / "config.json"


def gemm_us(m, k, n):
    """A plausible bf16 H100 GEMM time: launch floor, 70 % of peak FLOP/s, 80 % of HBM bandwidth."""
    return max(4.0, 2.0 * m * k * n / (0.7 * H100.bf16_flops) * 1e6,
               2.0 * (m * k + k * n + m * n) / (0.8 * H100.hbm_bytes_per_s) * 1e6)


GEMM_M = [2 ** i for i in range(14)]
GEMM_K, GEMM_N = (4096, 14336), (4096, 6144, 28672, 128256)  # every GEMM of Llama-3.1-8B at TP 1
DEC_B, DEC_L = (1, 8, 64), (1, 16, 256, 4096, 65536)
PRE_B, PRE_L = (1, 4), (16, 128, 1024, 8192, 32768)


def dec_us(b, L):
    return 8.0 + b * L * 2 * 8 * 128 * 2 / (0.7 * H100.hbm_bytes_per_s) * 1e6


def bench(root, gemm=None, decode=None, prefill=None):
    """Small H100 tables for Llama-3.1-8B at TP 1 (head layout 32-8-128), monotone in work (no adjustment).
    ``gemm`` / ``decode`` / ``prefill``: {key: µs} replacing single points ((m, k, n), (batch, kv_len),
    (batch, seq_len)), or a string replacing the whole file."""
    g = root / "gemm" / "h100_sxm"
    g.mkdir(parents=True, exist_ok=True)
    if isinstance(gemm, str):
        (g / "data.csv").write_text(gemm)
    else:
        rows = ["m,k,n,latency_us,dtype"] + [
            f"{m},{k},{n},{(gemm or {}).get((m, k, n), gemm_us(m, k, n)):.6g},bf16"
            for k in GEMM_K for n in GEMM_N for m in GEMM_M]
        (g / "data.csv").write_text("\n".join(rows) + "\n")
    for kind, over, cols, B, L, f in (
            ("decode", decode, "dtype,kv_dtype,batch_size,kv_len,latency_us", DEC_B, DEC_L,
             lambda b, x: f"bf16,bf16,{b},{x}"),
            ("prefill", prefill, "dtype,batch_size,seq_len,latency_us", PRE_B, PRE_L, lambda b, x: f"bf16,{b},{x}")):
        d = root / "mha" / kind / "h100_sxm"
        d.mkdir(parents=True, exist_ok=True)
        if isinstance(over, str):
            (d / "32-8-128.csv").write_text(over)
            continue
        base = dec_us if kind == "decode" else (lambda b, x: 10.0 + b * 4 * 32 * 128 * x * x / 2 / (0.5 * H100.bf16_flops) * 1e6)
        rows = [cols] + [f"{f(b, x)},{(over or {}).get((b, x), base(b, x)):.6g}" for b in B for x in L]
        (d / "32-8-128.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def clean_bench(tmp_path):
    return bench(tmp_path / "bench")


# ---------------------------------------------------------------- 1. quantized configs

@pytest.mark.parametrize("q,needle", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128}, "4-bit weight-only (awq) is not supported yet"),
    ({"quant_method": "gptq", "bits": 8}, "8-bit weight-only (gptq)"),
    ({"quant_method": "awq_marlin"}, "4-bit weight-only (awq_marlin)"),
    ({"quant_method": "mxfp4"}, "4-bit floating-point weights (mxfp4)"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, "NVFP4"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "4-bit bitsandbytes"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
     "4-bit int weights"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}}},
     "4-bit float weights"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}},
     "8-bit int weights"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float"}}},
      "kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "quantized KV cache"),
    ({"quant_method": "some_new_method"}, "quantization method 'some_new_method' is not supported yet"),
    ({"bits": 4}, "has no quant_method"),
    ("fp8", "must be an object or null"),
])
def test_quantized_weights_the_model_cannot_price_are_refused(q, needle):
    with pytest.raises(InputError, match="quantization_config") as e:
        ModelConfig.from_dict({**LLAMA, "quantization_config": q}, "m", "cfg.json")
    assert needle in str(e.value) and str(e.value).startswith("cfg.json: field 'quantization_config")


def test_awq_config_refused_on_the_command_line(tmp_path, capsys, clean_bench):
    cfg = write_config(tmp_path / "cfgs", "awq", quantization_config={"quant_method": "awq", "bits": 4})
    recs = write_records(tmp_path / "r.jsonl", record(model="awq"))
    out = tmp_path / "o.jsonl"
    one_error(capsys, ["predict", recs, "--model-configs", tmp_path / "cfgs", "--calibration", "none",
                       "--bench-data", clean_bench, "--out", out], f"{recs}:1", str(cfg), "field 'quantization_config.quant_method'",
              "4-bit weight-only (awq) is not supported yet")
    assert not out.exists()


@pytest.mark.parametrize("q", [
    {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    {"quant_method": "fbgemm_fp8"},
    {"quant_method": "modelopt", "quant_algo": "FP8"},
    {"quant_method": "compressed-tensors", "format": "float-quantized", "kv_cache_scheme": None,
     "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                   "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
                                   "targets": ["Linear"]}}},
])
def test_fp8_configs_give_fp8_weights(q):
    assert ModelConfig.from_dict({**LLAMA, "quantization_config": q}, "m", "cfg.json").dtype == "fp8"


@pytest.mark.parametrize("q", [None, {}])
def test_no_quantization(q):
    assert quantized_weight_dtype(q) is None
    assert ModelConfig.from_dict({**LLAMA, "quantization_config": q}, "m", "cfg.json").dtype == "bf16"


def test_quantized_configs_are_not_priced_as_bf16(tmp_path, clean_bench):
    """fp8 configs (fp8, compressed-tensors float8) are priced exactly as a record's dtype override to fp8
    (same shapes, GEMM table and trace-time choices: the step time is a function of these and the steps);
    quantization_config null is priced as bf16."""
    cfgs = tmp_path / "cfgs"
    write_config(cfgs, "bf16")
    write_config(cfgs, "null", quantization_config=None)
    write_config(cfgs, "fp8", quantization_config={"quant_method": "fp8"})
    write_config(cfgs, "ct", quantization_config={"quant_method": "compressed-tensors", "config_groups": {
        "g": {"weights": {"num_bits": 8, "type": "float"}}}})
    pred = Predictor(str(cfgs), str(clean_bench))
    su = {m: pred.setup_for(parse_record(record(model=m), "r.jsonl:1")) for m in ("bf16", "null", "fp8", "ct")}
    su["override"] = pred.setup_for(parse_record(record(model="bf16", dtype="fp8"), "r.jsonl:2"))

    def pricing(s):
        return s.on_gpu.dims, s.static, s.gemm_table_dtype, s.on_gpu.hw
    assert pricing(su["null"]) == pricing(su["bf16"])
    assert pricing(su["fp8"]) == pricing(su["ct"]) == pricing(su["override"]) != pricing(su["bf16"])
    assert su["fp8"].on_gpu.dims.weight_bytes == 1.0 and su["fp8"].on_gpu.hw.peak_flops == H100.fp8_flops


# ---------------------------------------------------------------- 2. invalid config values

@pytest.mark.parametrize("key,value,needle", [
    ("sliding_window", -1, "sliding_window"), ("sliding_window", 0.5, "sliding_window"),
    ("sliding_window", 0, "sliding_window"), ("sliding_window", True, "sliding_window"),
    ("sliding_window", "4096", "sliding_window"),
    ("head_dim", 0, "head_dim"), ("head_dim", -128, "head_dim"), ("head_dim", 128.0, "head_dim"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("architectures", "LlamaForCausalLM", "architectures"), ("architectures", [1], "architectures"),
    ("max_position_embeddings", -1, "max_position_embeddings"),
    ("max_position_embeddings", 1e40, "max_position_embeddings"),
    ("hidden_size", True, "hidden_size"), ("num_hidden_layers", "32", "num_hidden_layers"),
    ("vocab_size", 0, "vocab_size"), ("intermediate_size", None, "intermediate_size"),
])
def test_invalid_config_values_are_refused(key, value, needle):
    with pytest.raises(InputError, match=f"field '{needle}'"):
        ModelConfig.from_dict({**LLAMA, key: value}, "m", "cfg.json")


def test_config_defaults_for_null_values():
    cfg = {**LLAMA, "sliding_window": None, "head_dim": None, "num_key_value_heads": None,
           "max_position_embeddings": None, "quantization_config": None}
    m = ModelConfig.from_dict(cfg, "m", "cfg.json")
    assert math.isinf(m.sliding_window) and m.head_dim == 128 and m.num_kv_heads == 32
    assert math.isinf(m.max_position_embeddings)
    # a window a config switches off is not read (Qwen2 configs carry one with use_sliding_window false)
    assert math.isinf(ModelConfig.from_dict({**LLAMA, "use_sliding_window": False, "sliding_window": 0},
                                            "m", "c").sliding_window)
    assert ModelConfig.from_dict({**LLAMA, "sliding_window": 4096}, "m", "c").sliding_window == 4096


def test_head_dim_cannot_be_derived_from_an_uneven_hidden_size():
    with pytest.raises(InputError, match="field 'head_dim': missing, and hidden_size=4100"):
        ModelConfig.from_dict({**LLAMA, "hidden_size": 4100}, "m", "cfg.json")


@pytest.mark.parametrize("raw,needle", [
    (b"[1, 2]", "a model config must be a JSON object, got an array"),
    (b'"LlamaForCausalLM"', "got a string"),
    (b"null", "got null"),
    (b'{"hidden_size": 4096,\n "note": "caf\xe9"}', ":2: not UTF-8 text: byte 0xe9"),
    (b"", "malformed JSON"),
    (b'{"hidden_size": 4096,\n', "malformed JSON"),
])
def test_malformed_config_files(tmp_path, capsys, clean_bench, raw, needle):
    cfg = write_config(tmp_path / "cfgs", raw=raw)
    recs = write_records(tmp_path / "r.jsonl", record())
    one_error(capsys, ["predict", recs, "--model-configs", tmp_path / "cfgs", "--calibration", "none",
                       "--bench-data", clean_bench],
              f"{recs}:1", str(cfg), needle)


def test_config_with_byte_order_mark_is_read(tmp_path):
    cfg = write_config(tmp_path, raw=b"\xef\xbb\xbf" + json.dumps(LLAMA).encode())
    assert load_model(str(cfg)).hidden_size == 4096


@pytest.mark.parametrize("kv,tp,ok", [(12, 8, False), (6, 4, False), (12, 4, True), (8, 16, True), (4, 8, True),
                                      (3, 8, False), (1, 8, True), (8, 8, True)])
def test_kv_heads_must_split_evenly_or_replicate_under_tp(kv, tp, ok):
    """vLLM: KV heads >= TP must be a multiple of TP, fewer KV heads must divide TP."""
    m = ModelConfig.from_dict({**LLAMA, "num_attention_heads": 96, "num_key_value_heads": kv,
                               "hidden_size": 12288, "intermediate_size": 16384 * 3}, "m96", "c")
    if ok:
        assert ops.dims(m, tp).kv_heads == max(kv // tp, 1)
    else:
        with pytest.raises(InputError, match=f"field 'tp': tp={tp} must divide num_key_value_heads={kv} of m96"):
            ops.dims(m, tp)


def test_kv_heads_tp_rule_on_the_command_line(tmp_path, capsys, clean_bench):
    write_config(tmp_path / "cfgs", "m96", num_attention_heads=96, num_key_value_heads=12, hidden_size=12288)
    recs = write_records(tmp_path / "r.jsonl", record(model="m96", tp=8))
    one_error(capsys, ["predict", recs, "--model-configs", tmp_path / "cfgs", "--calibration", "none",
                       "--bench-data", clean_bench],
              f"{recs}:1", "field 'tp'", "num_key_value_heads=12")


# ---------------------------------------------------------------- 2/3. invalid records

@pytest.mark.parametrize("step,field,needle", [
    ({"prefill": [[512, 0, 99999]]}, "prefill", "must be [new, cached]"),
    ({"prefill": [[512]]}, "prefill", "must be [new, cached]"),
    ({"decode": [float("nan")]}, "decode", "finite"),
    ({"decode": [float("inf")]}, "decode", "finite"),
    ({"prefill": [[float("-inf"), 0]]}, "prefill.new", "finite"),
    ({"prefill": [[16, float("nan")]]}, "prefill.cached", "finite"),
    ({"decode": [1e40]}, "decode", "more than the limit of 1e+12"),
    ({"decode": [10 ** 13]}, "decode", "more than the limit"),
    ({"decode": [10 ** 400]}, "decode", "401-digit number"),
    ({"prefill": [[10 ** 15, 0]]}, "prefill.new", "more than the limit"),
    ({"prefill": [[16, 2 ** 41]]}, "prefill.cached", "more than the limit"),
    ({"decode": [True]}, "decode", "integer"),
    ({"decode": ["5"]}, "decode", "integer"),
    ({"decode": [2.5]}, "decode", "integer"),
])
def test_invalid_steps_are_refused(step, field, needle):
    with pytest.raises(InputError, match=f"field '{field}'") as e:
        validate_step(step, "r.jsonl:3 step 0")
    assert needle in str(e.value) and str(e.value).startswith("r.jsonl:3 step 0")


def test_token_counts_up_to_the_limit_are_accepted():
    assert validate_step({"decode": [MAX_TOKENS], "prefill": [[MAX_TOKENS, 0], [1.0, 2.0]]}, "x") == \
        ([(MAX_TOKENS, 0), (1, 2)], [MAX_TOKENS])
    assert np.isfinite(np.asarray(pack_steps([{"decode": [MAX_TOKENS]}]).decode_ctx)).all()


@pytest.mark.parametrize("text", [
    '{"id": "a", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"decode": [NaN]}]}',
    '{"id": "a", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"decode": [Infinity]}]}',
    '{"id": "a", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"prefill": [[-Infinity, 0]]}]}',
    '{"id": "a", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"decode": [1e40]}]}',
    '{"id": "a", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"prefill": [[512, 0, 99999]]}]}',
])
def test_non_finite_and_huge_counts_on_the_command_line(tmp_path, capsys, text):
    """Python's json reads NaN and Infinity; they are refused like any bad count (one line, exit 2)."""
    recs = tmp_path / "r.jsonl"
    recs.write_text(json.dumps(record(id="ok")) + "\n" + text + "\n")
    out = tmp_path / "o.jsonl"
    one_error(capsys, ["predict", recs, "--calibration", "none", "--out", out], f"{recs}:2 step 0")
    assert not out.exists()


@pytest.mark.parametrize("field,value,needle", [
    ("id", None, "non-empty string or an integer"), ("id", [1], "non-empty string or an integer"),
    ("id", True, "non-empty string or an integer"), ("id", "", "non-empty string"),
    ("model", 5, "non-empty string"), ("model", None, "non-empty string"),
    ("gpu", ["h100"], "non-empty string"), ("gpu", 100, "non-empty string"),
    ("tp", -1, "positive integer"), ("tp", 0, "positive integer"), ("tp", True, "positive integer"),
    ("tp", 1.0, "positive integer"), ("tp", "1", "positive integer"), ("tp", float("nan"), "positive integer"),
    ("kind", 5, "must be a string"), ("source", [1], "must be a string"),
    ("vllm_version", [0, 15], "version string"), ("vllm_version", True, "version string"),
    ("dtype", 5, "unknown dtype"), ("dtype", "int4", "unknown dtype"),
    ("measured_us", float("inf"), "positive number"), ("measured_us", "12", "positive number"),
    ("timing", 1, "timing"), ("async_scheduling", "yes", "true or false"),
    ("steps", {"decode": [1]}, "non-empty list"), ("steps", [], "non-empty list"),
])
def test_wrong_types_for_record_fields(field, value, needle):
    with pytest.raises(InputError, match=f"field '{field}'") as e:
        parse_record(record(**{field: value}), "r.jsonl:7")
    assert needle in str(e.value) and str(e.value).startswith("r.jsonl:7")


def test_accepted_optional_values():
    r = parse_record(record(id=7, vllm_version=0.15, kind=None, source="run-1", dtype=" BF16 "), "r.jsonl:1")
    assert r.id == "7" and r.engine == "0.15" and r.dtype == "bf16"


def test_records_not_utf8(tmp_path, capsys):
    recs = tmp_path / "r.jsonl"
    recs.write_bytes(json.dumps(record(id="ok")).encode() + b"\n" +
                     json.dumps(record(id="b", source="SRC")).encode().replace(b"SRC", b"caf\xe9") + b"\n")
    one_error(capsys, ["predict", recs, "--calibration", "none"], f"{recs}:2", "not UTF-8 text: byte 0xe9")


def test_records_with_byte_order_mark_are_read(tmp_path):
    recs = write_records(tmp_path / "r.jsonl", raw=b"\xef\xbb\xbf" + json.dumps(record()).encode() + b"\n")
    assert read_records(recs)[0].id == "a"


@pytest.mark.parametrize("raw,needle", [(b"", "no records"), (b"\n \n", "no records"), (b"[1]\n", "JSON object"),
                                        (b"\x00\x01\n", "malformed JSON"), (b"\xff\xfe{}\n", "not UTF-8")])
def test_empty_and_binary_record_files(tmp_path, raw, needle):
    with pytest.raises(InputError, match=needle):
        read_records(write_records(tmp_path / "r.jsonl", raw=raw))


# ---------------------------------------------------------------- 6. unknown record fields warn

def test_unknown_record_fields_are_named_in_one_warning(tmp_path):
    recs = write_records(tmp_path / "r.jsonl", record(id="a", measurd_us=3.0, foo=1),
                         record(id="b", foo=2, steps=[{"decode": [5], "decodes": [7]}]),
                         record(id="c", max_num_batched_tokens=2048, approx=True))
    with pytest.warns(InputWarning) as w:
        out = read_records(recs)
    assert len(out) == 3 and len(w) == 1
    msg = str(w[0].message)
    assert msg.startswith(f"{recs}: unknown field(s) ignored: ")
    assert "'measurd_us' (line 1; did you mean 'measured_us'?)" in msg and "'foo' (lines 1, 2)" in msg
    assert "'steps[].decodes' (line 2; did you mean 'decode'?)" in msg
    assert "max_num_batched_tokens" not in msg and "approx" not in msg


def test_known_fields_do_not_warn(tmp_path):
    recs = write_records(tmp_path / "r.jsonl", record(measured_us=10.0, kind="step", source="s", dtype="bf16",
                                                      vllm_version="0.15.1", timing="own", async_scheduling=False,
                                                      max_num_batched_tokens=8192, approx=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        read_records(recs)


# ---------------------------------------------------------------- 3/4. kernel tables

GEMM_HEADER = "m,k,n,latency_us,dtype\n"


@pytest.mark.parametrize("text,where,needle", [
    (GEMM_HEADER + "1,4096,4096,inf,bf16\n2,4096,4096,5,bf16\n", ":2", "field 'latency_us': non-finite value inf"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n2,4096,4096,-Infinity,bf16\n", ":3", "field 'latency_us': non-finite"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n2,4096,4096,nan,bf16\n", ":3", "field 'latency_us': non-numeric"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n2,4096,4096,0,bf16\n", ":3", "field 'latency_us': non-positive value 0"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n2,4096,4096,5,int8\n", ":3", "field 'dtype': unknown dtype 'int8'"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n2,4096,4096,5,\n", ":3", "field 'dtype': unknown dtype"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n\n2,4096,4096,5,bf16,x\n", ":4", "6 fields, but the first row has 5"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n2,4096,4096\n", ":3", "3 fields, but the first row has 5"),
    (GEMM_HEADER + "1,4096,4096,5,bf16\n", "", "field 'm': bf16 rows need at least two values of m"),
    (GEMM_HEADER, "", "no data rows (a header only)"),
    ("", "", "empty file"),
    ("m,k,n,latency_us,dtype\n1,4096,4096,5,bf16\n2,4096,4096,5,caf\xe9\n", ":3", "not UTF-8 text"),
    ("m,k,n,dtype\n1,4096,4096,bf16\n", "", "missing column(s) ['latency_us']"),
])
def test_bad_gemm_tables(tmp_path, text, where, needle):
    path = tmp_path / "data.csv"
    path.write_bytes(text.encode("latin-1") if "\xe9" in text else text.encode())
    with pytest.raises(InputError) as e:
        load_gemm(path, Adjustments())
    assert str(e.value).startswith(f"{path}{where}: ") and needle in str(e.value)


def _dec(rows, header="dtype,kv_dtype,batch_size,kv_len,latency_us\n"):
    return header + "".join(f"{r}\n" for r in rows)


@pytest.mark.parametrize("kind,text,needle", [
    ("decode", _dec([]), "32-8-128.csv: no data rows (a header only)"),
    ("decode", _dec(["bf16,bf16,1,16,10"]), "h100_sxm: field 'kv_len': needs at least two values of kv_len"),
    ("decode", _dec(["fp8,fp8,1,16,10", "fp8,fp8,1,32,11"]),
     "h100_sxm: field 'dtype': no rows with bf16/fp16 activations and KV cache in 1 file(s) (found dtype=fp8"),
    ("decode", _dec(["bf16,bf16,1,16,10", "bf16,bf16,0,32,11"]), "32-8-128.csv:3: field 'batch_size': non-positive"),
    ("decode", _dec(["bf16,bf16,1,16,10", "bf16,bf16,1,32,1e999"]), "32-8-128.csv:3: field 'latency_us': non-finite"),
    ("prefill", "dtype,batch_size,seq_len,latency_us\nbf16,1,128,20\n", "field 'seq_len': needs at least two"),
])
def test_bad_attention_tables(tmp_path, capsys, kind, text, needle):
    root = bench(tmp_path / "bench", **{kind: text})
    one_error(capsys, ["tables", "--gpu", "H100", "--bench-data", root], needle)


def test_bad_allreduce_table(tmp_path, capsys):
    root = bench(tmp_path / "bench")
    d = root / "allreduce" / "h100_sxm"
    d.mkdir(parents=True)
    (d / "data.csv").write_text("kernel,num_gpus,message_bytes,latency_us\ncustom_allreduce,2,1024,5\n")
    one_error(capsys, ["tables", "--gpu", "H100", "--bench-data", root], "field 'message_bytes': needs at least two")
    (d / "data.csv").write_text("kernel,num_gpus,message_bytes,latency_us\n")
    one_error(capsys, ["tables", "--gpu", "H100", "--bench-data", root], "data.csv: no data rows")


def test_attention_file_without_bf16_rows_is_skipped_with_a_note(tmp_path):
    root = bench(tmp_path / "bench")
    (root / "mha" / "decode" / "h100_sxm" / "16-4-128.csv").write_text(
        _dec(["fp8,fp8,1,16,10", "fp8,fp8,1,32,11"]))
    t = load_tables(root, H100)
    assert t.decode_heads == [(32, 8, 128)]
    assert any("16-4-128.csv: skipped, no rows with bf16/fp16" in n for n in t.notes)


# ---------------------------------------------------------------- 4. noise policy robust to one outlier

def test_low_outliers():
    x = np.log(np.array([1.0, 2, 4, 8, 16, 32]))
    t = np.array([5.0, 5.5, 6.0, 0.5, 12.0, 24.0])
    assert low_outliers(t, x).tolist() == [False, False, False, True, False, False]
    # a drop the next point confirms is a faster kernel, not an outlier; ends are never judged
    assert not low_outliers(np.array([50.0, 50, 50, 5, 5.2, 5.4]), x).any()
    assert not low_outliers(np.array([0.1, 5.0, 5.0, 5.0, 5.0, 0.1]), x).any()
    # dips up to OUTLIER_FACTOR are kept (the repo's tables have genuine 6x dips); missing cells are skipped
    assert not low_outliers(np.array([5.0, 5.5, 6.0, 6.5 / OUTLIER_FACTOR * 1.01, 12.0, 24.0]), x).any()
    assert low_outliers(np.array([5.0, np.nan, 6.0, 0.5, np.nan, 24.0]), x).tolist() == \
        [False, False, False, True, False, False]


def _series(tables, dtype, k, n):
    """The m-series of GEMM shape (k, n) as loaded (µs)."""
    g = tables.gemm[dtype]
    i, j = int(np.argmin(np.abs(np.asarray(g.log_k) - np.log(k)))), int(np.argmin(np.abs(np.asarray(g.log_n) - np.log(n))))
    return np.exp(np.asarray(g.log_t[i, j], np.float64))


def test_one_low_outlier_no_longer_lowers_its_gemm_series(tmp_path):
    """A 1 µs point in the middle of an m-series used to pull every smaller m down to 1 µs (lower envelope);
    it is now dropped, refilled from its neighbours, and reported; the rest of the series is unchanged."""
    clean = load_tables(bench(tmp_path / "clean"), H100)
    bad = load_tables(bench(tmp_path / "bad", gemm={(256, 14336, 4096): 1.0}), H100)
    ref = _series(clean, "bf16", 14336, 4096)
    got = _series(bad, "bf16", 14336, 4096)
    i = GEMM_M.index(256)
    assert np.allclose(np.delete(got, i), np.delete(ref, i), rtol=1e-6)
    assert ref[i - 1] < got[i] < ref[i + 1]  # refilled between its neighbours
    # the plain lower envelope would have lowered the points below it to 1 µs
    assert (suffix_min(np.where(np.arange(len(ref)) == i, 1.0, ref), (0,))[:i] == 1.0).all()
    (a,) = [a for a in bad.adjustments if a.reason != "envelope"]
    assert (a.table, a.where, a.measured_us) == ("gemm/bf16", "m=256 k=14336 n=4096", 1.0)
    assert a.used_us == pytest.approx(got[i], rel=1e-5)
    assert any("m=256 k=14336 n=4096: 1 µs dropped as a measurement error" in n for n in bad.notes)
    assert not clean.adjustments and not clean.notes


def test_gemm_points_faster_than_peak_flops_are_dropped(tmp_path):
    """A point 3x faster than its neighbours is kept by the outlier rule but beats the GPU's peak FLOP/s."""
    m, k, n = 2048, 14336, 4096
    peak_us = 2.0 * m * k * n / H100.bf16_flops * 1e6
    t = load_tables(bench(tmp_path / "b", gemm={(m, k, n): peak_us / 2}), H100)
    (a,) = [a for a in t.adjustments if a.reason != "envelope"]
    assert a.reason == "beats peak" and a.used_us > peak_us
    assert any("faster than the GPU's peak FLOP/s allows" in note for note in t.notes)


def test_gemm_table_in_wrong_units_is_refused(tmp_path, capsys):
    """Times in seconds (or another GPU's table) beat the peak FLOP/s everywhere the GEMMs are large."""
    rows = [GEMM_HEADER.strip()] + [f"{m},{k},{n},{gemm_us(m, k, n) * 1e-6:.6g},bf16"
                                    for k in GEMM_K for n in GEMM_N for m in GEMM_M]
    root = bench(tmp_path / "b", gemm="\n".join(rows) + "\n")
    one_error(capsys, ["tables", "--gpu", "H100", "--bench-data", root], "field 'latency_us'",
              "times are faster than H100-SXM's peak FLOP/s allows", "are the times in µs")


def test_decode_outlier_is_dropped(tmp_path):
    t = load_tables(bench(tmp_path / "b", decode={(8, 4096): 0.5}), H100)
    (a,) = t.adjustments
    assert (a.table, a.where, a.reason) == ("decode", "32-8-128 batch=8 kv_len=4096", "outlier")
    assert dec_us(8, 256) < a.used_us < dec_us(8, 65536)


def test_repo_tables_load_with_the_same_adjustments(h100_repo):
    """The outlier rules change nothing in the repo's own tables (their noise stays envelope-only)."""
    assert all(a.reason == "envelope" for a in h100_repo.adjustments)
    assert not any("measurement error" in n for n in h100_repo.notes)


def test_predict_warns_about_moved_points_it_reads(tmp_path, capsys):
    """One warning line names the points the noise policy lowered by more than 25 % or dropped, among those
    the records read; points it did not read are not named."""
    m_hi = 256  # o_proj at m=256 measured 3x too slow: the envelope lowers it to the m=512 time (-33 %)
    root = bench(tmp_path / "b", gemm={(512, 4096, 6144): 1.0, (m_hi, 4096, 4096): 3 * gemm_us(m_hi, 4096, 4096),
                                       (64, 14336, 4096): 1.0})
    recs = write_records(tmp_path / "r.jsonl",  # GEMMs at M = 511 + 1 and m_hi - 1 + 1 tokens
                         record(id="x", model="llama-3.1-8b", steps=[{"prefill": [[511, 0]], "decode": [100]}]),
                         record(id="y", model="llama-3.1-8b", steps=[{"prefill": [[m_hi - 1, 0]], "decode": [100]}]))
    rc, out, err = cli(capsys, "predict", recs, "--bench-data", root, "--calibration", "none")
    assert rc == 0 and len(err) == 1 and err[0].startswith("costmodel: warning: these predictions read 2 table point(s)")
    assert "H100-SXM gemm/bf16 m=512 k=4096 n=6144 (1 -> " in err[0] and "dropped: beats peak" in err[0]
    assert f"H100-SXM gemm/bf16 m={m_hi} k=4096 n=4096" in err[0] and "m=64 k=14336" not in err[0]


def test_predict_on_clean_tables_prints_no_warning(tmp_path, capsys, clean_bench):
    recs = write_records(tmp_path / "r.jsonl", record(model="llama-3.1-8b"))
    rc, _, err = cli(capsys, "predict", recs, "--bench-data", clean_bench, "--calibration", "none")
    assert rc == 0 and err == []


# ---------------------------------------------------------------- 5. implausible contexts warn

def test_context_beyond_max_position_embeddings_warns(tmp_path, capsys, clean_bench):
    write_config(tmp_path / "cfgs", "short", max_position_embeddings=4096)
    recs = write_records(tmp_path / "r.jsonl", record(id="fits", model="short", steps=[{"decode": [4095]}]),
                         record(id="long", model="short", steps=[{"prefill": [[512, 4000]]}]),
                         record(id="long2", model="short", steps=[{"decode": [70000]}], extra_field=1))
    rc, out, err = cli(capsys, "predict", recs, "--model-configs", tmp_path / "cfgs", "--bench-data", clean_bench,
                       "--calibration", "none")
    assert rc == 0 and "3 records" in out and len(err) == 2
    assert err[0] == f"costmodel: warning: {recs}: unknown field(s) ignored: 'extra_field' (line 3)"
    assert err[1].startswith("costmodel: warning: 2 record(s) hold contexts longer than their model's "
                             "max_position_embeddings")
    assert f"{recs}:2 (4512 > 4096 for short)" in err[1] and f"{recs}:3 (70001 > 4096 for short)" in err[1]
    assert f"{recs}:1" not in err[1]


# ---------------------------------------------------------------- 3. kernel queries (costmodel kernels)

@pytest.mark.parametrize("text,where,needle", [
    ("op,m,n,k,dtype\ngemm,64,4096,4096,bf16,extra\n", ":2", "6 fields, but the first row has 5"),
    ("op,m,n,k,dtype\ngemm,64,4096,4096,bf16\ngemm,64,4096,4096,bf16,extra\n", ":3", "6 fields"),
    ("op,m,n,k,dtype\n", "", "no query rows (a header only)"),
    ("", "", "empty file"),
    ("op,m,n,k,dtype\n\ngemm,1e40,4096,4096,bf16\n", ":3", "field 'm': 1e40 is more than the limit"),
    ("op,m,n,k,dtype\ngemm,inf,4096,4096,bf16\n", ":2", "field 'm': must be an integer >= 1"),
    ("op,batch_size,kv_len,num_heads,num_kv_heads,head_dim\nattn_decode,1,100,32,12,128\n", ":2",
     "field 'num_kv_heads': num_heads=32 is not a multiple of num_kv_heads=12"),
])
def test_bad_kernel_queries(tmp_path, capsys, clean_bench, text, where, needle):
    q, out = tmp_path / "q.csv", tmp_path / "k.csv"
    q.write_text(text)
    one_error(capsys, ["kernels", q, "--gpu", "H100", "--bench-data", clean_bench, "--out", out],
              f"{q}{where}: ", needle)
    assert not out.exists()


def test_kernel_query_not_utf8(tmp_path, clean_bench):
    q = tmp_path / "q.csv"
    q.write_bytes(b"op,m,n,k,dtype,note\ngemm,64,4096,4096,bf16,ok\ngemm,64,4096,4096,bf16,caf\xe9\n")
    with pytest.raises(InputError, match=f"{q}:3: not UTF-8 text"):
        predict_kernel_csv(q, "H100", clean_bench)


# ---------------------------------------------------------------- 6. a little fuzzing

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
RECORD_KEYS = ["id", "model", "gpu", "tp", "steps", "measured_us", "kind", "source", "dtype", "timing",
               "async_scheduling", "vllm_version", "unknown"]
STEP_VALUES = st.fixed_dictionaries({}, optional={"prefill": JSON | st.lists(st.lists(JSON, max_size=3), max_size=2),
                                                  "decode": JSON | st.lists(JSON, max_size=3)})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(RECORD_KEYS), value=JSON, step=STEP_VALUES)
def test_fuzz_record_parser(key, value, step):
    """Any value in any field, any step: a valid Record whose steps pack into finite arrays, or InputError."""
    obj = record(**{key: value})
    if key != "steps":
        obj["steps"] = [step]
    try:
        r = parse_record(obj, "f.jsonl:1")
    except InputError as e:
        assert str(e).startswith("f.jsonl:1")
        return
    steps = pack_steps(r.steps)
    assert all(np.isfinite(np.asarray(a)).all() for a in steps)
    assert isinstance(r.tp, int) and r.tp >= 1 and isinstance(r.model, str) and isinstance(r.gpu, str)


CONFIG_KEYS = list(LLAMA) + ["head_dim", "sliding_window", "use_sliding_window", "max_position_embeddings",
                             "quantization_config", "dtype"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(CONFIG_KEYS), value=JSON, tp=st.sampled_from([1, 2, 3, 8, 16]))
def test_fuzz_config_loader(key, value, tp):
    """Any value for any config key: a model whose per-GPU shapes are positive and finite, or InputError."""
    try:
        m = ModelConfig.from_dict({**LLAMA, key: value}, "m", "c.json")
    except InputError as e:
        assert str(e).startswith("c.json")
        return
    try:
        d = ops.dims(m, tp)
    except InputError as e:
        assert "field 'tp'" in str(e)
        return
    assert all(np.isfinite(v) and v >= 0 for v in d) and d.kv_heads >= 1 and d.head_dim >= 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_fuzz_record_file_bytes(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        read_records(path)
    except InputError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(st.sampled_from(["1", "2", "64", "4096", "0", "-1", "inf", "nan", "x", "", "bf16",
                                               "fp8", '"a,b"', "1e400"]), min_size=0, max_size=6),
                     max_size=5))
def test_fuzz_gemm_table(tmp_path, rows):
    """Random cells under a GEMM header: a table whose values are finite and positive, or InputError."""
    path = tmp_path / "data.csv"
    path.write_text(GEMM_HEADER + "".join(",".join(r) + "\n" for r in rows))
    try:
        tabs, _, _ = load_gemm(path, Adjustments(), H100)
    except InputError:
        return
    for g in tabs.values():
        assert np.isfinite(np.asarray(g.log_t)).all()


# ---------------------------------------------------------------- 6. more of the same kinds

def test_duplicate_record_fields_are_refused(tmp_path):
    recs = tmp_path / "r.jsonl"
    recs.write_text(json.dumps(record(id="ok")) + "\n" +
                    '{"id": "b", "model": "m", "gpu": "H100", "tp": 1, "tp": 8, "steps": [{"decode": [1]}]}\n')
    with pytest.raises(InputError, match=f"{recs}:2: field 'tp': appears twice"):
        read_records(recs)
    recs.write_text('{"id": "b", "model": "m", "gpu": "H100", "tp": 1, "steps": [{"decode": [1], "decode": [2]}]}\n')
    with pytest.raises(InputError, match="field 'decode': appears twice"):
        read_records(recs)


def test_attention_files_not_named_as_a_head_layout_are_skipped_with_a_note(tmp_path):
    root = bench(tmp_path / "bench")
    d = root / "mha" / "decode" / "h100_sxm"
    good = (d / "32-8-128.csv").read_text()
    for name in ("32-8-128-tp3.csv", "32-3-128-tp8.csv", "0-0-128.csv", "notes.csv"):
        (d / name).write_text(good)
    t = load_tables(root, H100)
    assert t.decode_heads == [(32, 8, 128)]
    for name in ("32-8-128-tp3.csv", "32-3-128-tp8.csv", "0-0-128.csv", "notes.csv"):
        assert any(n.startswith(f"{d / name}: skipped") for n in t.notes), name


def test_each_record_and_point_is_warned_about_once_per_predictor(tmp_path):
    """A fit prices subsets of its records again (leave-one-run-out): nothing is named twice."""
    write_config(tmp_path / "cfgs", "short", max_position_embeddings=64)
    root = bench(tmp_path / "b", gemm={(256, 4096, 4096): 3 * gemm_us(256, 4096, 4096)})
    recs = [parse_record(record(id=str(i), model="short", steps=[{"prefill": [[255, 0]], "decode": [100 + i]}]),
                         f"r.jsonl:{i + 1}") for i in range(2)]
    pred = Predictor(str(tmp_path / "cfgs"), str(root))
    with pytest.warns(InputWarning) as w:
        pred.features(recs)
    assert len(w) == 2 and "2 record(s)" in str(w[0].message) and "m=256 k=4096 n=4096" in str(w[1].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        pred.features(recs[:1])
