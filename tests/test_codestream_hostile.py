"""Code streams as an attacker writes them: every truncation point and a flipped bit at every byte of packed and
range-coded streams, random bytes, header, frame and end fields forged to huge, zero, negative, nested and
mismatched values (checksums recomputed), decompression bombs and damaged code frequencies.  Each group is
decoded in a subprocess whose address space is capped at what its imports took plus 1 GiB
(tests/hostile_streams.py): every decode must end in StreamError or BundleError, or give the exact indices
(forged codes inside well-formed records: codes in range), and never in another exception, a MemoryError or a
crash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "hostile_streams.py"


def _decode(group: str) -> tuple[dict, list[dict]]:
    result = subprocess.run([sys.executable, str(WORKER), group], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, f"the worker died (exit {result.returncode}):\n{result.stderr[-3000:]}"
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return lines[0], lines[1:]


def _check(outcomes: list[dict]) -> None:
    wrong = [o for o in outcomes if not (
        o["outcome"] in ("StreamError", "BundleError")
        or (o["outcome"] == "ok" and (o["exact"] or (o["garbage"] and o["in_range"]))))]
    assert not wrong, "\n".join(f"{o['case']} ({o['source']}): {o}" for o in wrong[:20])


def _by_case(outcomes: list[dict]) -> dict[str, dict]:
    return {o["case"]: o for o in outcomes if o["source"] == "file"}


@pytest.mark.parametrize("group", ["damage", "random"])
def test_truncated_flipped_and_random_streams_all_end_in_stream_errors(group):
    header, outcomes = _decode(group)
    assert header["cap_bytes"] > 0 and len(outcomes) == 2 * header["cases"] >= 600
    _check(outcomes)
    assert all(o["outcome"] == "StreamError" for o in outcomes)  # none is a valid stream


def test_forged_fields_are_refused_before_they_allocate():
    _, outcomes = _decode("fields")
    _check(outcomes)
    cases = _by_case(outcomes)
    for coding in ("packed", "entropy"):
        assert cases[f"{coding}: unchanged"]["exact"] and cases[f"{coding}: end record samples -5 (unknown)"]["exact"]
        expected = {
            "segments declared 0xFFFFFFFF bytes": "holds 4294967295 bytes" if coding == "packed" else "no fewer than",
            "header JSON 100,000 levels deep": "nested too deeply",
            "header field nested 50,000 levels": "nested too deeply",
            "header length 4294967295": "beyond 1048576 bytes",
            "frame shape [1, 4294967295, 3]": "beyond max_frame_codes",
            "frame shape [0, 50, 3]": "holds no codes",
            "frame shape [1, 0, 3]": "holds no codes",
            "second frame of another batch size": "does not continue the stream's earlier frames",
            "two frames of (1, 2^24, 3) codes in empty range-coded segments": "beyond max_frame_codes",
            "(1, 2^22, 3) codes in empty range-coded segments": "declares 4194304 codes in 0 range-coded bytes",
            "words the range decoder refuses": "range coder refuses the data (AssertionError",
            "end record tokens + 1": "steps of the frame axis",
            "end record samples beyond the tokens": "end record counts 1361 samples",
            "end record samples short of the tokens": "cannot hold",
            "header layers True": "layer count True",
        }
        for name, message in expected.items():
            outcome = cases[f"{coding}: {name}"]
            assert outcome["outcome"] == "StreamError" and message in outcome["message"], (name, outcome)


def test_frames_that_hold_many_codes_decode_within_the_limits():
    _, outcomes = _decode("limits")
    _check(outcomes)
    cases = _by_case(outcomes)
    assert cases["a packed frame of 3 x 5.6 million codes (10, 7 and 1 bits)"]["exact"]
    assert cases["one-code layers: 2^24 codes in one frame"]["exact"]
    beyond = cases["one-code layers: 3 x 2^24 codes, beyond max_codes"]
    assert beyond["outcome"] == "StreamError" and "more than max_codes=33,554,432 codes" in beyond["message"]


def test_damaged_code_frequencies_fail_entropy_coded_streams_only():
    _, outcomes = _decode("frequencies")
    _check(outcomes)
    for name, outcome in _by_case(outcomes).items():
        if name.endswith("packed stream"):
            assert outcome["exact"], name  # packing never reads the frequencies
        else:
            assert outcome["outcome"] == "BundleError", (name, outcome)
