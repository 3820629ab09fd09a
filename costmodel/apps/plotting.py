"""Figures of the applications (matplotlib is optional: without it a figure is skipped with a message).

`serving_curves` turns `serve` outputs into curves — latency against load for one deployment — and
`plot_serving` draws them: TTFT and TPOT against the clients of closed-loop records that differ only in their
concurrency, TTFT and ITL against the request rate of each open-loop record's stages, predicted as lines and
measured as open markers where the records file has a ``measured`` block.
"""
from __future__ import annotations

MISSING = "matplotlib is not installed: --plot skipped"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _deployment_key(rec: dict) -> tuple:
    """What a closed-loop curve holds fixed: the record less its id, measurement and concurrency."""
    w = {k: v for k, v in rec.get("workload", {}).items() if k != "concurrency"}
    rest = {k: v for k, v in rec.items() if k not in ("id", "measured", "workload")}
    return repr(sorted(rest.items())), repr(sorted(w.items()))


def _label(rec: dict) -> str:
    w = rec.get("workload", {})
    if rec.get("mode") == "disagg":
        pools = [(role, rec.get(role) or {}) for role in ("prefill", "decode")]
        layout = " + ".join(f"{p.get('num_workers', 1)}x {role} TP{p.get('tp_size', 1)}"
                            + (f" DP-att{p['attention_dp_size']}" if (p.get("attention_dp_size") or 1) > 1 else "")
                            for role, p in pools)
    else:
        layout = f"TP{rec.get('tp', 1)}" + (f" DP-att{rec['attention_dp']}" if rec.get("attention_dp", 1) > 1 else "") \
            + (f" EP{rec['moe_ep']}" if rec.get("moe_ep", 1) > 1 else "")
    lengths = f" {w['input_tokens']}/{w['output_tokens']}" if "input_tokens" in w else ""
    return f"{rec.get('model')} {rec.get('gpu')} {layout}{lengths}"


def _series(predicted: list[dict], measured: list[dict], key: str) -> tuple[list, list]:
    """(predicted, measured) values of ``key`` per point; None where a point lacks it."""
    return [p.get(key) for p in predicted], [m.get(key) for m in measured]


def serving_curves(records: list[dict], outs: list[dict]) -> list[dict]:
    """Curves of priced records: {"kind": "closed" | "open", "label", "x" (clients | requests/s),
    "ttft_ms": (predicted, measured), "tpot_ms": (predicted, measured)}, each a list per point (measured None
    where the record has none; open loop: ITL in "tpot_ms").  ``records``: the records as read, with their
    ``measured`` blocks; ``outs``: `serve.serve`'s outputs for them."""
    by_id = {str(r.get("id")): r for r in records}
    closed: dict = {}
    curves = []
    for o in outs:
        rec = by_id.get(o["id"])
        if rec is None or "predicted" not in o:
            continue
        w, p, m = rec.get("workload", {}), o["predicted"], rec.get("measured") or {}
        if w.get("type") == "closed":
            clients = w.get("concurrency") or o.get("simulation", {}).get("clients")  # disagg: the default clients
            closed.setdefault(_deployment_key(rec), []).append((clients, rec, p, m))
        elif p.get("stages"):
            ms = m.get("stages") or [{}] * len(p["stages"])
            curves.append({"kind": "open", "label": f"{_label(rec)} ({rec['id']})",
                           "x": [st["rate"] for st in w["stages"]],
                           "ttft_ms": _series(p["stages"], ms, "ttft_mean_ms"),
                           "tpot_ms": _series(p["stages"], ms, "itl_mean_ms")})
    for pts in closed.values():
        pts.sort(key=lambda t: t[0])
        preds, meas = [p for _, _, p, _ in pts], [m for *_, m in pts]
        curves.append({"kind": "closed", "label": _label(pts[0][1]), "x": [c for c, *_ in pts],
                       "ttft_ms": _series(preds, meas, "ttft_mean_ms"),
                       "tpot_ms": _series(preds, meas, "tpot_mean_ms")})
    return curves


def plot_serving(curves: list[dict], path, most: int = 12) -> str:
    """Draw ``curves`` (`serving_curves`; the first ``most``) into a PNG at ``path``: one row of two panels
    (TTFT; TPOT or ITL) per workload kind present.  Returns the line to print."""
    plt = pyplot()
    if plt is None:
        return MISSING
    shown = curves[:most]
    kinds = [k for k in ("closed", "open") if any(c["kind"] == k for c in shown)]
    if not kinds:
        return f"nothing to plot: no priced record ({path} not written)"
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        for i, c in enumerate(x for x in shown if x["kind"] == kind):
            color = f"C{i % 10}"
            for ax, key in zip(row, ("ttft_ms", "tpot_ms")):
                pred, meas = c[key]
                ax.plot(c["x"], pred, "-", c=color, marker=".", label=c["label"])
                pts = [(x, y) for x, y in zip(c["x"], meas) if y is not None]
                if pts:
                    ax.plot(*zip(*pts), "o", mfc="none", c=color)
        xlabel = "clients (concurrency)" if kind == "closed" else "request rate (requests/s)"
        for ax, name in zip(row, ("mean TTFT (ms)", "mean TPOT (ms)" if kind == "closed" else "mean ITL (ms)")):
            ax.set(xlabel=xlabel, ylabel=name, xscale="log" if kind == "closed" else "linear",
                   yscale="log" if kind == "closed" else "linear")
        row[0].set_title(f"{kind} loop: lines predicted, circles measured", fontsize=9)
        row[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    more = f" (the first {most} of {len(curves)} curves)" if len(curves) > most else ""
    return f"wrote {path}{more}"
