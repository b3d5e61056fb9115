#!/usr/bin/env python3
"""Writes tests/RELIABILITY.md from the figures the test run left in tests/.work/figures/*.json.

Each figures file is a flat JSON object written by one campaign:

| file          | written by                                   |
|---------------|----------------------------------------------|
| crash.json    | tests/system/test_crash_campaign.py          |
| upstream.json | tests/system/test_upstream_faults.py         |
| local.json    | tests/system/test_local_faults.py            |
| fuzz.json     | the bounded cargo-fuzz run                   |
| abuse.json    | the network abuse test                       |
| power_cut.json| tests/system/test_power_cut.py (QEMU VM)     |

A missing file is shown as "not run". The exit status is 1 if any figure reports a lost instance (a key
`lost`, or ending in `_lost` / `.lost`, with a value above 0): a run that loses an instance fails CI. It is
2 if a figures file cannot be read.

    python3 tests/reliability_report.py [--figures DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SOURCES = {
    "crash": "kill -9 / crash-point campaign",
    "upstream": "upstream faults (fault-injecting proxy)",
    "local": "local faults (disk full, corruption, index rebuild, 2 GB instance)",
    "fuzz": "cargo-fuzz, bounded run",
    "abuse": "network abuse against the DICOM port",
    "power_cut": "power cuts (QEMU VM, spool on a virtual disk, SIGKILL of QEMU)",
}
NOT_RUN = "not run"


def load(figures_dir: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """(name -> figures, name -> why unreadable) for every *.json in `figures_dir`."""
    figures: dict[str, dict] = {}
    broken: dict[str, str] = {}
    for path in sorted(figures_dir.glob("*.json")) if figures_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            broken[path.stem] = str(e)
            continue
        if not isinstance(data, dict):
            broken[path.stem] = "not a JSON object"
            continue
        data["_written_at"] = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"
        )
        figures[path.stem] = data
    return figures, broken


def is_lost_key(key: str) -> bool:
    return key == "lost" or key.endswith("_lost") or key.endswith(".lost")


def losses(figures: dict[str, dict]) -> list[str]:
    """Every figure that reports a lost instance, as "file: key = value"."""
    out = []
    for name, data in figures.items():
        for key, value in data.items():
            if is_lost_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                out.append(f"{name}.json: {key} = {value}")
    return out


def fmt(value: object) -> str:
    if value is None:
        return NOT_RUN
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def pick(data: dict | None, *keys: str) -> object:
    """The first of `keys` present in `data` (None if the file is missing or has none of them)."""
    if data is None:
        return None
    for k in keys:
        if k in data:
            return data[k]
    return None


def cases(data: dict | None, prefix: str) -> str:
    """"P of R passed" from `<prefix>_cases_passed`/`_run`, or from the per-case results."""
    if data is None:
        return NOT_RUN
    passed, run = data.get(f"{prefix}_cases_passed"), data.get(f"{prefix}_cases_run")
    results = [v for k, v in data.items() if k.startswith(f"{prefix}_case_")]
    if run is None and results:
        run, passed = len(results), sum(1 for v in results if v == "passed")
    if run is None:
        passed = pick(data, "cases_passed", "survived", "cases_survived")
        run = pick(data, "cases_run", "cases")
    if run is None:
        return fmt(passed) if passed is not None else "no case figures"
    return f"{passed} of {run} passed"


def fuzz_executions(data: dict | None) -> list[tuple[str, object]]:
    """(target, executions) from keys naming executions (e.g. `executions.pdu`, `pdu_execs`)."""
    if data is None:
        return []
    out = []
    for k, v in sorted(data.items()):
        if ("exec" in k or "runs" in k) and isinstance(v, (int, float)):
            target = k
            for token in ("executions", "execs", "exec", "runs"):
                target = target.replace(token, "")
            out.append((target.strip("._-") or k, v))
        elif isinstance(v, dict):
            runs = pick(v, "executions", "execs", "runs")
            if runs is not None:
                out.append((k, runs))
    return out


def peak_rss(figures: dict[str, dict]) -> list[tuple[str, object]]:
    return [
        (f"{name}.json: {k}", v)
        for name, data in sorted(figures.items())
        for k, v in sorted(data.items())
        if ("peak_rss" in k or "rss_peak" in k or "vmhwm" in k.lower())
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
    ]


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB RAM"
    except OSError:
        pass
    parts = [platform.node(), f"{platform.system()} {platform.release()} {platform.machine()}",
             f"{os.cpu_count()} CPU(s)" + (f" ({cpu})" if cpu else ""), mem]  # fmt: skip
    return ", ".join(p for p in parts if p)


def render(figures: dict[str, dict], broken: dict[str, str], lost: list[str]) -> str:
    crash, upstream, local = figures.get("crash"), figures.get("upstream"), figures.get("local")
    fuzz, abuse = figures.get("fuzz"), figures.get("abuse")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability figures",
        "",
        f"Generated by `tests/reliability_report.py` on {now}, on {machine()}.",
        "Figures come from the last test run (`tests/.work/figures/*.json`); \"not run\" means that campaign",
        "left no figures.",
        "",
        f"**Verdict: {'FAILED, instances were lost' if lost else 'no acknowledged instance was lost'}.**",
        "",
        "## Summary",
        "",
        "| figure | value |",
        "|---|---|",
        f"| crash rounds (kill -9 and crash points) | {fmt(pick(crash, 'rounds'))} |",
        f"| acknowledged (C-STORE success) | {fmt(pick(crash, 'acknowledged'))} |",
        f"| delivered to the PACS | {fmt(pick(crash, 'delivered'))} |",
        f"| lost | {fmt(pick(crash, 'lost'))} |",
        f"| duplicates upstream | {fmt(pick(crash, 'duplicates_upstream', 'duplicates'))} |",
        f"| power cuts (VM) | {fmt(pick(figures.get('power_cut'), 'power_cuts'))} |",
        f"| power cuts: acknowledged / lost / duplicates upstream | {fmt(pick(figures.get('power_cut'), 'acknowledged'))}"
        f" / {fmt(pick(figures.get('power_cut'), 'lost'))} / {fmt(pick(figures.get('power_cut'), 'duplicates_upstream'))} |",
        f"| upstream fault cases | {cases(upstream, 'upstream')} |",
        f"| local fault cases | {cases(local, 'local')} |",
        f"| abuse cases survived | {cases(abuse, 'abuse')} |",
    ]
    execs = fuzz_executions(fuzz)
    if fuzz is None:
        lines.append(f"| fuzz executions | {NOT_RUN} |")
    elif not execs:
        lines.append("| fuzz executions | no execution figures |")
    for target, n in execs:
        lines.append(f"| fuzz executions, `{target}` | {fmt(n)} |")
    rss = peak_rss(figures)
    if not rss:
        lines.append(f"| peak RSS of passerelled | {NOT_RUN} |")
    for key, v in rss:
        lines.append(f"| peak RSS (MiB), {key} | {fmt(v)} |")
    if lost:
        lines += ["", "## Lost instances", ""] + [f"- {x}" for x in lost]
    if broken:
        lines += ["", "## Unreadable figures files", ""] + [f"- `{n}.json`: {why}" for n, why in sorted(broken.items())]
    lines += ["", "## Every figure, per campaign", ""]
    for name in list(SOURCES) + sorted(set(figures) - set(SOURCES)):
        title = SOURCES.get(name, name)
        data = figures.get(name)
        lines.append(f"### {name}: {title}")
        lines.append("")
        if data is None:
            lines += [f"{NOT_RUN.capitalize()}." if name not in broken else "Unreadable (see above).", ""]
            continue
        lines += [f"Written {data['_written_at']}.", "", "| key | value |", "|---|---|"]
        for k, v in sorted(data.items()):
            if k != "_written_at":
                lines.append(f"| `{k}` | {fmt(v) if not isinstance(v, (dict, list)) else json.dumps(v)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", type=Path, default=TESTS / ".work" / "figures")
    ap.add_argument("--out", type=Path, default=TESTS / "RELIABILITY.md")
    args = ap.parse_args(argv)
    figures, broken = load(args.figures)
    lost = losses(figures)
    args.out.write_text(render(figures, broken, lost))
    print(f"Wrote {args.out} from {len(figures)} figures file(s) in {args.figures}.")
    if lost:
        print("FAILED: instances were lost: " + "; ".join(lost), file=sys.stderr)
        return 1
    if broken:
        print("FAILED: unreadable figures files: " + ", ".join(sorted(broken)), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
