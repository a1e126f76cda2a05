"""The quantization report as a table for people (the same data is in ``--json`` and the manifest)."""

from __future__ import annotations

from typing import Any, Mapping


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_report(report: Mapping[str, Any], *, stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = report["reference"]
    gate = report["gate"]
    title = (f"target {report['target']} · --quantize {report['requested']} · float reference: "
             f"{ref['size'] / 1024:.1f} KiB, p50 {ref['p50_ms']:.3f} ms"
             + (f", accuracy {ref['accuracy']:.4f}" if ref.get("accuracy") is not None else ""))
    t = Table(title=title, title_justify="left")
    for col, just in (("candidate", "left"), ("size KiB", "right"), ("size", "right"), ("accuracy", "right"),
                      ("drop pp", "right"), ("top-1 agree", "right"), ("cosine", "right"), ("p50 ms", "right"),
                      ("p99 ms", "right"), ("speed", "right"), ("decision", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in report["candidates"]:
        decision = ("[bold green]chosen[/]" if c["chosen"] else "[green]kept[/]" if c["kept"] else "[red]dropped[/]")
        t.add_row(
            c["name"], _f(c["size"] / 1024 if c["size"] else None, ".1f"), _f(c["size_ratio"], ".2f") + "x",
            _f(c["accuracy"], ".4f"), _f(c["accuracy_drop_pp"], "+.2f"), _f(c["agreement"], ".4f"),
            _f(c["cosine"] if c["cosine"] is not None else c["check_cosine"], ".4f"),
            _f(c["p50_ms"], ".3f"), _f(c["p99_ms"], ".3f"), _f(c["speedup"], ".2f") + "x",
            f"{decision} {c['reason']}",
        )
    console = Console(stderr=stderr, highlight=False, width=max(120, Console().width))
    console.print(t)
    basis = (f"{gate['eval_samples']} labelled eval samples, max drop {gate['max_accuracy_drop_pp']:g} pp"
             if gate["labelled"] else
             f"{gate['eval_samples']} unlabelled eval samples, min cosine {gate['min_cosine']:g}"
             if gate["eval_samples"] else "no --eval data: fidelity check only")
    console.print(f"gate: {basis}; fidelity on {gate['check_samples']} {gate['check_data']} samples "
                  f"(fp16 cosine >= {gate['fp16_min_cosine']:g}, int8 cosine >= {gate['int8_min_cosine']:g})")
    if report.get("chosen"):
        console.print(f"chosen: [bold]{report['chosen']}[/] (smallest, then fastest, among those kept)")
