"""The table of GPU targets from the results benchmarks/gpu_check.sh leaves (one folder of JSON files, the
CUDA tests' JUnit XML and the versions), in Markdown: target, measured, the reference measured in the same run.

    python benchmarks/gpu_table.py .dev/gpu

A target whose section did not run (or failed) is listed as "not measured", never left out.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

NOT_MEASURED = "not measured"


def _load(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _harness_row(results, case: str, mode: str, compiled: bool, impl: str) -> dict:
    for row in (results or {}).get("rows", []):
        if row["case"] == case and row["mode"] == mode and row["compiled"] == compiled:
            return row.get(impl, {})
    return {}


def _ms(value) -> str:
    return f"{value:.3f} ms" if isinstance(value, (int, float)) else NOT_MEASURED


def _mb(value) -> str:
    return f"{value:.0f} MB" if isinstance(value, (int, float)) else NOT_MEASURED


def _verdict(value, limit) -> str:
    if not isinstance(value, (int, float)):
        return NOT_MEASURED
    return "met" if value <= limit else f"missed ({value / limit:.2f}x the limit)"


def _tests(folder: Path) -> dict[str, str]:
    """test id -> passed / failed / skipped, from the JUnit XML."""
    try:
        root = ElementTree.parse(folder / "tests.xml").getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    outcome = {}
    for case in root.iter("testcase"):
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed"
            elif child.tag == "skipped":
                state = "skipped"
        outcome[case.get("name")] = state
    return outcome


def _all_passed(tests: dict[str, str], prefix: str) -> tuple[str, str]:
    chosen = {name: state for name, state in tests.items() if name.startswith(prefix)}
    ran = {name: state for name, state in chosen.items() if state != "skipped"}
    if not ran:
        return (f"{len(chosen)} skipped" if chosen else NOT_MEASURED), NOT_MEASURED
    passed = sum(state == "passed" for state in ran.values())
    skipped = f", {len(chosen) - len(ran)} skipped" if len(ran) < len(chosen) else ""
    return f"{passed}/{len(ran)} passed{skipped}", "met" if passed == len(ran) else "missed"


def rows(folder: Path) -> list[tuple[str, str, str, str]]:
    """(target, measured, reference in the same run, verdict) for every target."""
    out = []

    def harness(results, case, mode, limit_ms, label, limit_mb=None):
        ours = _harness_row(results, case, mode, True, "vqdeploy")
        ref = _harness_row(results, case, mode, False, "reference")
        speed = f" ({ref['ms'] / ours['ms']:.1f}x faster)" if "ms" in ours and "ms" in ref else ""
        out.append((f"{label} {mode}, compiled: <= {limit_ms} ms", _ms(ours.get("ms")),
                    f"1.14.17 eager {_ms(ref.get('ms'))}{speed}", _verdict(ours.get("ms"), limit_ms)))
        if limit_mb is not None:
            out.append((f"{label} {mode} peak memory: <= {limit_mb} MB", _mb(ours.get("peak_mb")),
                        f"1.14.17 eager {_mb(ref.get('peak_mb'))}", _verdict(ours.get("peak_mb"), limit_mb)))

    vq = _load(folder, "vq.json")
    harness(vq, "1024 codes", "eval", 1.3, "VectorQuantize 1024 codes, dim 256, 64 x 1024 tokens,")
    harness(vq, "1024 codes", "train", 2.5, "VectorQuantize 1024 codes, dim 256, 64 x 1024 tokens,", 2048)
    rvq = _load(folder, "rvq.json")
    harness(rvq, "plain", "eval", 8, "ResidualVQ 8 x 1024,")
    harness(rvq, "plain", "train", 15, "ResidualVQ 8 x 1024,")
    lfq = _load(folder, "lfq.json")
    harness(lfq, "lfq 2^16", "train", 5, "LFQ 2^16, 16 x 1024 tokens,", 1024)

    export = _load(folder, "export.json")
    for case in ("vq", "rvq"):
        row = next((r for r in (export or {}).get("rows", []) if r["case"] == case and r["graph"] == "encode"), None)
        if row is None:
            out.append((f"onnxruntime CUDA encode ({case}), IO binding: <= 1.2x PyTorch compiled", NOT_MEASURED,
                        NOT_MEASURED, NOT_MEASURED))
            continue
        if row["providers"] != "CUDAExecutionProvider":
            out.append((f"onnxruntime CUDA encode ({case}), IO binding: <= 1.2x PyTorch compiled",
                        f"{NOT_MEASURED}: onnxruntime ran on {row['providers']}", NOT_MEASURED, NOT_MEASURED))
            continue
        ratio = row["ort_ms"] / row["compiled_ms"]
        torch_search = row.get("compiled_torch_search_ms")
        like = f"; {row['ort_ms'] / torch_search:.2f}x compiled with the float32 search" if torch_search else ""
        out.append((f"onnxruntime CUDA encode ({case}), IO binding: <= 1.2x PyTorch compiled",
                    f"{_ms(row['ort_ms'])} = {ratio:.2f}x compiled{like} ({row['providers']})",
                    f"PyTorch compiled {_ms(row['compiled_ms'])}, float32 search {_ms(torch_search)}",
                    _verdict(ratio, 1.2)))

    tests = _tests(folder)
    measured, verdict = _all_passed(tests, "test_runtime_binds_cuda_tensors_and_runs_argmin_on_the_gpu")
    out.append(("ArgMin and MatMul placed on the GPU (onnxruntime profile)", measured, "-", verdict))
    measured, verdict = _all_passed(tests, "test_compiled_training_step_makes_no_host_sync")
    out.append(("no host sync in a compiled training step (10 quantizer setups)", measured, "-", verdict))
    measured, verdict = _all_passed(tests, "test_fused_search")
    out.append(("fused search equals float64 (adversarial cases, benchmark size)", measured, "-", verdict))
    failed = sorted(name for name, state in tests.items() if state == "failed")
    if tests:
        measured, verdict = _all_passed(tests, "")
        out.append(("tests/test_cuda.py", measured, "-",
                    verdict if not failed else "failed: " + ", ".join(failed)[:300]))

    search = (_load(folder, "search.json") or {}).get("rows", [])

    def pick(**keys):
        return next((r for r in search if all(r.get(k) == v for k, v in keys.items())), {})

    for size, limit in ((1024, 0.4), (8192, 1.5)):
        for data in ("gaussian", "near"):
            fused = pick(codes=size, data=data, search="fused bf16 x16")
            torch_row = pick(codes=size, data=data, search="torch float32")
            floor = pick(codes=size, search="mm bf16")
            exact = fused.get("exact")
            measured = (f"{_ms(fused.get('ms'))}, {exact:.5f} of rows = float64, {fused['certified']:.4f} certified"
                        if fused else NOT_MEASURED)
            reference = (f"float32 torch {_ms(torch_row.get('ms'))} ({torch_row.get('exact', float('nan')):.5f} = "
                         f"float64); bf16 mm alone {_ms(floor.get('ms'))}" if torch_row else NOT_MEASURED)
            verdict = _verdict(fused.get("ms"), limit)
            if fused and exact != 1.0:
                verdict = "missed (not exact)"
            out.append((f"fused search {size} codes, dim 256, 64 x 1024 rows, {data} data: <= {limit} ms, exact",
                        measured, reference, verdict))
    for mode in ("eval", "train"):
        fused = pick(mode=mode, fused=True)
        plain = pick(mode=mode, fused=False)
        gain = f" ({plain['ms'] / fused['ms']:.2f}x)" if fused and plain else ""
        out.append((f"VectorQuantize 1024 {mode}, compiled, fused vs torch search", _ms(fused.get("ms")) + gain,
                    f"torch search {_ms(plain.get('ms'))}", "-"))
    return out


def main(argv=None) -> None:
    folder = Path((argv or sys.argv[1:] or [".dev/gpu"])[0])
    versions = _load(folder, "versions.json") or {}
    print(f"GPU: {versions.get('gpu', '?')}; torch {versions.get('torch', '?')} (CUDA {versions.get('cuda', '?')}), "
          f"triton {versions.get('triton', '?')}, onnxruntime {versions.get('onnxruntime', '?')} "
          f"{versions.get('providers', '')}, Python {versions.get('python', '?')}\n")
    print("| target | measured | reference, same run | verdict |")
    print("|---|---|---|---|")
    for target, measured, reference, verdict in rows(folder):
        print(f"| {target} | {measured} | {reference} | {verdict} |")


if __name__ == "__main__":
    main()
