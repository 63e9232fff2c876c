"""The GPU check (tools/gpu_check.sh): tests/test_gpu.py and the GPU benchmarks in one budgeted run, one JSON."""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine() -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
            "names": [torch.cuda.get_device_name(i) for i in range(gpus)]}


def junit_results(path: str) -> list[dict]:
    """pytest's JUnit XML -> [{name, status, seconds, detail}], status passed / failed / skipped."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        status, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = "skipped" if tag == "skipped" else "failed"
                detail = (node.get("message") or node.text or "")[:2000]
                break
        rows.append({"name": case.get("name"), "status": status, "seconds": float(case.get("time", 0)),
                     "detail": detail})
    return rows


def run_part(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, or None when it ran past `timeout`; the output's tail)."""
    try:
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        return res.returncode, (res.stdout + res.stderr)[-4000:]
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out[-4000:]


def run(budget_s: float = 480.0) -> dict:
    """Run every part the machine can (printing progress), within `budget_s`; returns the results."""
    start = time.monotonic()
    result = {"machine": machine(), "tests": [], "benchmark": None, "skipped": [], "failed": []}
    gpus = result["machine"]["gpus"]
    if gpus == 0:
        why = "no CUDA GPU is visible: every GPU check skipped (run this on a GPU node)"
        print(why)
        result["skipped"].append({"part": "all", "why": why})
    else:
        print(f"{gpus} GPU(s): {', '.join(result['machine']['names'])}; budget {budget_s:.0f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            xml = os.path.join(tmp, "tests.xml")
            code, tail = run_part([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                                   f"--junitxml={xml}"], timeout=0.6 * budget_s)
            result["tests"] = junit_results(xml) if os.path.exists(xml) else []
            if code is None:
                result["failed"].append({"part": "tests", "why": f"ran past {0.6 * budget_s:.0f} s", "tail": tail})
            elif code not in (0, 5) and not any(t["status"] == "failed" for t in result["tests"]):
                result["failed"].append({"part": "tests", "why": f"pytest exited {code}", "tail": tail})
            result["failed"] += [{"part": t["name"], "why": t["detail"]} for t in result["tests"]
                                 if t["status"] == "failed"]
            left = budget_s - (time.monotonic() - start)
            bench = os.path.join(tmp, "bench.json")
            if left < 60:
                result["skipped"].append({"part": "benchmark", "why": f"{left:.0f} s of the budget left"})
            else:
                code, tail = run_part([sys.executable, "tools/benchmark.py", "--only", "pattention", "mfu", "generate",
                                       "long_context", "--out", bench], timeout=left)
                if os.path.exists(bench):
                    with open(bench) as f:
                        result["benchmark"] = json.load(f)
                if code != 0:
                    why = f"ran past the budget ({left:.0f} s left)" if code is None else f"exited {code}"
                    result["failed"].append({"part": "benchmark", "why": why, "tail": tail})
    result["seconds"] = time.monotonic() - start
    counts = {s: sum(t["status"] == s for t in result["tests"]) for s in ("passed", "failed", "skipped")}
    print(f"tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
          f"benchmark: {'done' if result['benchmark'] else 'not run'}; {result['seconds']:.0f} s")
    for f in result["failed"]:
        print(f"FAILED {f['part']}: {f['why'][:300]}")
    return result
