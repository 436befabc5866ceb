"""Write the results: a Markdown table (latest.md), a CSV (latest.csv), a PNG chart (latest.png).

The chart needs matplotlib (the optional `bench` extra); without it that step is skipped with
a note, so the harness runs where only the test extras are installed (CI).
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from collections.abc import Sequence

from benchmarks.runner import Row

COLUMNS = [
    "cell", "format", "size", "mailbox", "writers", "mailboxes", "variant", "agent", "kind", "msgs_per_s", "ms_per_msg",
    "p50_ms", "p90_ms", "p99_ms", "cpu_ms_per_msg", "rss_mb", "rss_max_mb", "x_procmail", "x_python",
    "x_python_I", "x_fsync_floor", "delivered", "failed", "integrity", "integrity_ok", "fsync", "note",
]


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if digits == 0 or value >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _same(rows: Sequence[Row], row: Row, key: str) -> Row | None:
    """Agent `key` in the same cell, delivering to the same kind of mailbox (twin or not)."""
    for other in rows:
        if other.cell is row.cell and other.agent.key == key and other.samples and other.variant == row.variant:
            return other
    for other in rows:  # floors have no twin
        if other.cell is row.cell and other.agent.key == key and other.samples:
            return other
    return None


def _ratio(row: Row, other: Row | None) -> float | None:
    a = row.ms_per_msg()
    b = other.ms_per_msg() if other is not None else None
    return a / b if a and b else None


def _python_floor(row: Row, isolated: bool) -> str:
    env = "system" if row.agent.key == "vdeliver" else "venv"
    return f"python{'-I' if isolated else ''}-{env}"


def figures(rows: Sequence[Row], syncs: dict[tuple[str, str], str] | None = None) -> list[dict[str, object]]:
    """One dict of figures per row; syncs: (agent key, format) -> sync calls counted by strace."""
    syncs = syncs or {}
    out = []
    for row in rows:
        cell = row.cell
        is_vdeliver_cli = row.agent.key.startswith("vdeliver") and row.agent.kind == "process"
        integ = row.integrity
        out.append({
            "cell": cell.key, "format": cell.fmt, "size": cell.size_name, "mailbox": cell.large_label,
            "writers": cell.writers, "mailboxes": cell.boxes, "variant": row.variant,
            "agent": row.agent.label + (" [empty mailbox, same turns]" if row.variant else ""),
            "kind": row.agent.kind,
            "msgs_per_s": row.msgs_per_s(), "ms_per_msg": row.ms_per_msg(),
            "p50_ms": row.percentile(50), "p90_ms": row.percentile(90), "p99_ms": row.percentile(99),
            "cpu_ms_per_msg": row.cpu_ms(), "rss_mb": row.rss_mb(), "rss_max_mb": row.rss_max_mb(),
            "x_procmail": _ratio(row, _same(rows, row, "procmail")),
            "x_python": _ratio(row, _same(rows, row, _python_floor(row, False))) if is_vdeliver_cli else None,
            "x_python_I": _ratio(row, _same(rows, row, _python_floor(row, True))) if is_vdeliver_cli else None,
            "x_fsync_floor": _ratio(row, _same(rows, row, "fsync-floor")),
            "delivered": row.ok_count(), "failed": len(row.errors),
            "integrity": integ.text() if integ is not None else ("-" if row.agent.kind == "floor" else "not checked"),
            "integrity_ok": integ.ok if integ is not None else None,
            "fsync": (f"{syncs[(row.agent.key, cell.fmt)]} per msg (strace); " if (row.agent.key, cell.fmt) in syncs
                      else "") + row.agent.fsync, "note": row.note or ("; ".join(sorted(set(row.errors)))[:200]),
        })
    return out


def write_csv(path: str, data: list[dict[str, object]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for item in data:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in item.items()})


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/etc/debian_version") as f:
            debian = f"Debian {f.read().strip()}"
    except OSError:
        debian = platform.platform()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", "/tmp"], capture_output=True, text=True).stdout.strip()
    return (f"{debian}, kernel {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem:.0f} GB RAM, "
            f"mail tree on {fs or 'unknown fs'} under /tmp, Python {platform.python_version()}")


def summary(data: list[dict[str, object]]) -> list[str]:
    """The headline table: 4 KB messages, empty mailbox, one writer, both formats side by side."""
    basic = [d for d in data if d["size"] == "4KB" and d["mailbox"] == "empty" and d["writers"] == 1
             and d["msgs_per_s"]]
    agents: list[str] = []
    for d in basic:
        if d["agent"] not in agents:
            agents.append(str(d["agent"]))
    if not agents:
        return []
    lines = [("| agent | mbox ms/msg | Maildir ms/msg | x procmail (mbox / Maildir) | CPU ms | peak RSS MB "
             "| sync calls per message (mbox / Maildir) |"),
             "|---|---:|---:|---:|---:|---:|---|"]
    for a in agents:
        by = {str(d["format"]): d for d in basic if d["agent"] == a}
        m, md = by.get("mbox"), by.get("maildir")

        def get(d: dict[str, object] | None, key: str, digits: int = 1) -> str:
            return _fmt(d[key], digits) if d is not None else "-"  # type: ignore[arg-type]

        def syncs(d: dict[str, object] | None) -> str:
            text = str(d["fsync"]) if d is not None else ""
            return text.split(" per msg", 1)[0] if " per msg" in text else "-"

        any_row = m or md
        lines.append(f"| {a} | {get(m, 'ms_per_msg')} | {get(md, 'ms_per_msg')} | {get(m, 'x_procmail', 2)} / "
                     f"{get(md, 'x_procmail', 2)} | {get(any_row, 'cpu_ms_per_msg')} | {get(any_row, 'rss_mb')} "
                     f"| {syncs(m)} / {syncs(md)} |")
    return lines


def write_markdown(path: str, data: list[dict[str, object]], header: list[str], goals: list[str]) -> None:
    lines = [*header, ""]
    head = summary(data)
    if head:
        lines += ["## Summary: 4 KB messages, empty mailbox, one writer", "", *head, ""]
    if goals:
        lines += ["## Goals, read against the figures", "", *goals, ""]
    lines += ["## Figures", "",
              ("msgs/s and ms/msg: median over repetitions (1 writer: per-message wall time from fork to reap; "
              "N writers: wall time of the whole batch). p50/p90/p99: latency of single deliveries, all repetitions. "
              "CPU: user+system of the delivering process (resident servers: all their processes, from /proc). "
              "RSS: median peak RSS of one delivery process (resident servers: the largest server process). "
              "x procmail / x python / x floor: ms/msg divided by that of procmail / `python -c pass` from the "
              "same environment / the in-process fsync floor, in the same cell of the same run."), ""]
    cells: list[str] = []
    for item in data:
        if item["cell"] not in cells:
            cells.append(str(item["cell"]))
    for cell in cells:
        items = [d for d in data if d["cell"] == cell]
        first = items[0]
        title = (f"{first['format']}, {first['size']}, {first['mailbox']} mailbox, {first['writers']} writer(s)"
                 + ("" if first["writers"] == 1 else f" into {first['mailboxes']} mailbox(es)"))
        lines += [f"### {title}", "",
                  ("| agent | msgs/s | ms/msg | p50 | p90 | p99 | CPU ms | RSS MB | x procmail | x python (-I) "
                  "| x floor | arrived | fsync |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for d in items:
            if d["msgs_per_s"] is None:
                lines.append(f"| {d['agent']} | skipped: {d['note'] or 'no data'} ||||||||||||")
                continue
            xpy = "-"
            if d["x_python"] is not None:
                xpy = f"{_fmt(d['x_python'], 2)} ({_fmt(d['x_python_I'], 2)})"  # type: ignore[arg-type]
            lines.append(
                f"| {d['agent']} | {_fmt(d['msgs_per_s'])} | {_fmt(d['ms_per_msg'], 2)} | {_fmt(d['p50_ms'], 2)} "  # type: ignore[arg-type]
                f"| {_fmt(d['p90_ms'], 2)} | {_fmt(d['p99_ms'], 2)} | {_fmt(d['cpu_ms_per_msg'], 2)} "  # type: ignore[arg-type]
                f"| {_fmt(d['rss_mb'])} | {_fmt(d['x_procmail'], 2)} | {xpy} | {_fmt(d['x_fsync_floor'], 1)} "  # type: ignore[arg-type]
                f"| {d['integrity']}{' (' + str(d['failed']) + ' failed)' if d['failed'] else ''} | {d['fsync']} |"
            )
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_chart(path: str, data: list[dict[str, object]]) -> str | None:
    """Throughput per agent (4 KB, empty, 1 writer) and ms/msg against mailbox size; None or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]'): no chart"
    fig, axes = plt.subplots(1, 3, figsize=(17, 6))
    basic = [d for d in data if d["size"] == "4KB" and d["mailbox"] == "empty" and d["writers"] == 1
             and d["kind"] != "floor" and d["msgs_per_s"]]
    agents: list[str] = []
    for d in basic:
        if d["agent"] not in agents:
            agents.append(str(d["agent"]))
    width = 0.4
    for j, fmt in enumerate(("mbox", "maildir")):
        values = []
        for a in agents:
            match = [d["msgs_per_s"] for d in basic if d["agent"] == a and d["format"] == fmt]
            values.append(float(match[0]) if match else 0.0)  # type: ignore[arg-type]
        axes[0].barh([i + j * width for i in range(len(agents))], values, height=width, label=fmt)
    axes[0].set_yticks([i + width / 2 for i in range(len(agents))], agents, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("messages per second (4 KB, empty mailbox, 1 writer; higher is better)")
    axes[0].legend()
    for ax, fmt in ((axes[1], "mbox"), (axes[2], "maildir")):
        # The large mailbox against the empty one delivered to in the same turns (same cell).
        rows = [d for d in data if d["format"] == fmt and d["writers"] == 1 and d["mailbox"] != "empty"
                and d["kind"] != "floor" and d["ms_per_msg"]]
        large = next((str(d["mailbox"]) for d in rows), "large")
        for d in rows:
            if d["variant"]:
                continue
            twin = next((t for t in rows if t["variant"] and t["cell"] == d["cell"]
                         and str(t["agent"]).startswith(str(d["agent"]))), None)
            if twin is None:
                continue
            ax.plot(["empty", large], [float(twin["ms_per_msg"]), float(d["ms_per_msg"])],  # type: ignore[arg-type]
                    marker="o", label=str(d["agent"]))
        ax.set_yscale("log")
        ax.set_ylabel("ms per message (log; lower is better)")
        ax.set_title(f"{fmt}: cost against mailbox size (same turns)")
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
