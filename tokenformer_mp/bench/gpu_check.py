"""The GPU check (tools/gpu_check.sh): what a CPU cannot prove about the GPU path, in parts ordered by value within a
time budget, every result kept as it comes.

Each part runs in a process group of its own (pytest over a named list of tests in tests/test_gpu.py, or sections of
tools/benchmark.py) and is killed whole at its deadline, so the GPU is free before the next part starts. `--out` gets
log.txt (everything, streamed), results.json (rewritten after every part), each part's JUnit XML and benchmark JSON.
This process never imports torch: it holds no GPU memory and never initialises CUDA.

A part fails when a test fails, when it passed fewer tests than it names, when it ran past its deadline, or when a
figure misses its bound (each bound is written beside its figure). Speed figures are recorded, and judged only against
the floors stated here with their reason.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..fileio import write_atomic

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GPU_TESTS = "tests/test_gpu.py::"

# A GPU whose bf16 matmul reaches less than half its datasheet peak is throttled, shared or misconfigured, and every
# speed figure after it would mislead (an H100 SXM measured 769-798 of its 989 TFLOP/s).
MATMUL_FLOOR_OF_DATASHEET = 0.5
# The long-context prediction (bench.memory.long_context_fit) against torch.cuda.max_memory_allocated at 150m, 32k:
# the prediction counts saved activations and the backward's transients from the model's shapes; the CUDA caching
# allocator's block rounding and cuBLAS workspaces are not in it.
LONG_CONTEXT_ERROR_BOUND = 0.15


@dataclass
class Part:
    key: str
    name: str
    what: str
    cap_s: float  # the most this part may take, budget permitting
    tests: list[tuple[int, str]] = field(default_factory=list)  # (GPUs it needs, test id in tests/test_gpu.py)
    sections: list[str] = field(default_factory=list)  # tools/benchmark.py sections
    on_cpu: bool = False  # rehearsed by --device cpu
    min_s: float = 30.0  # not started with less of the budget left
    min_gpus: int = 1  # part a finds how many there are


PARTS = [
    Part("a", "environment", "torch, CUDA, NCCL, the GPU, its bf16 8192^3 matmul TFLOP/s", 60,
         sections=["environment"], on_cpu=True, min_s=10, min_gpus=0),
    Part("b", "one_device_training", "the debug config on the bundled sample: 20 steps, save, stop, resume 5, "
         "bit-exact against the unbroken run (sync and async saves)", 150,
         tests=[(1, "test_resume_is_bit_exact_on_the_device[sync]"),
                (1, "test_resume_is_bit_exact_on_the_device[async]")], on_cpu=True),
    Part("c", "pattention_numerics", "Pattention bf16 against fp32 (eager, fused, compiled); CP's flash chunks", 120,
         tests=[(1, f"test_pattention_bf16_on_gpu_tracks_fp32_on_cpu[{v}]")
                for v in ("eager", "eager_recompute", "fused", "fused_recompute", "compiled")]
         + [(1, f"test_context_parallel_chunks_run_flash_attention_and_equal_full_attention[{cp}]") for cp in (2, 4)]),
    Part("d", "against_the_cpu", "one GPU against the CPU's fp32 run: debug losses with and without packed documents, "
         "a layout-free load then fused AdamW, an srun task at local rank 3; the Transformer eager and compiled", 150,
         tests=[(1, "test_layout_on_gpus_tracks_fp32_on_cpu[one_gpu]"),
                (1, "test_documents_on_a_gpu_track_fp32_on_cpu"),
                (1, "test_layout_free_load_then_a_fused_adam_step_on_the_gpu"),
                (1, "test_srun_tasks_with_one_visible_gpu_each[1]"),
                (1, "test_transformer_on_gpus_tracks_fp32_on_cpu[one_gpu]"),
                (1, "test_transformer_on_gpus_tracks_fp32_on_cpu[one_gpu_compile]")], on_cpu=True),
    Part("e", "mfu", "tokenformer-150m bf16: tokens/s, MFU against the measured and the datasheet peak, peak memory; "
         "eager then compiled; then the TokenFormer-124M step over the Transformer-124M's (equal parameters)", 240,
         sections=["mfu", "arch"], min_s=60),
    Part("f", "long_context_memory", "the long-context memory prediction against torch.cuda.max_memory_allocated, "
         "tokenformer-150m at 32k", 90, sections=["long_context"]),
    Part("g", "export_and_generate", "export-hf, then generation on the device through both our inference and "
         "transformers", 90, tests=[(1, "test_export_hf_and_generate_on_the_device")], on_cpu=True),
    Part("h", "layouts_over_nccl", "TP2, PP2, DP2, CP2 over NCCL against one process; the Transformer at TP2, PP2",
         180,
         tests=[(2, f"test_layout_on_gpus_tracks_fp32_on_cpu[{n}]") for n in ("tp2", "pp2", "dp2", "cp2")]
         + [(2, "test_srun_tasks_with_one_visible_gpu_each[2]")]
         + [(2, f"test_transformer_on_gpus_tracks_fp32_on_cpu[{n}]") for n in ("tp2", "pp2")], min_gpus=2),
]


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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we cannot signal still exists
        return True


def run_command(cmd: list[str], timeout: float, log, env: dict | None = None, grace_s: float = 10.0) -> dict:
    """Run `cmd` in a process group of its own, its output streamed line by line to `log` (a callable); at `timeout`
    the whole group gets SIGTERM, then SIGKILL after `grace_s`. Returns {rc (None: killed at its deadline), seconds,
    group_gone}: whether every process of the group had exited (the GPU is free) when it returned."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True, errors="replace", bufsize=1)
    reader = threading.Thread(target=lambda: [log(line.rstrip("\n")) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        rc = None
        log(f"[gpu_check] past its {timeout:.0f} s deadline: stopping the part's process group")
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
    # grandchildren (ranks, forkservers) may outlive the leader: the part is over only when the group is empty
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        if rc is not None:  # the leader exited and left some behind: they are the part's too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
        time.sleep(0.2)
    reader.join(timeout=5)
    return {"rc": rc, "seconds": round(time.monotonic() - start, 1), "group_gone": not _group_alive(proc.pid)}


class Check:
    """One run of the check: the log, the results as they come, and what each part found."""

    def __init__(self, out: str, budget_s: float, device: str, python: str = sys.executable):
        os.makedirs(out, exist_ok=True)
        self.out, self.budget_s, self.device, self.python = out, budget_s, device, python
        self.start = time.monotonic()
        self._log = open(os.path.join(out, "log.txt"), "a", buffering=1)
        self.results = {"device": device, "budget_s": budget_s, "python": python, "parts": [], "ok": None,
                        "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.gpus = 0

    def log(self, line: str) -> None:
        print(line, flush=True)
        self._log.write(line + "\n")

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def save(self) -> None:
        self.results["seconds"] = round(time.monotonic() - self.start, 1)
        write_atomic(os.path.join(self.out, "results.json"), json.dumps(self.results, indent=1))

    def env(self, part: Part) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENFORMER_CHECK_DEVICE=self.device,
                   TOKENFORMER_CHECK_RECORD=os.path.join(self.out, f"figures_{part.key}.jsonl"),
                   TOKENFORMER_SAMPLE_DIR=os.path.join(self.out, "sample"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
        return env

    def command(self, part: Part, timeout: float) -> tuple[list[str], list[str]]:
        """(the command, the test ids it must pass)."""
        if part.sections:
            return ([self.python, "tools/benchmark.py", "--only", *part.sections, "--out",
                     os.path.join(self.out, f"bench_{part.key}.json")], [])
        ids = [t for need, t in part.tests if self.device == "cpu" or need <= self.gpus]
        cmd = [self.python, "-m", "pytest", *[GPU_TESTS + t for t in ids], "-rA", "-v", "-s", "-p", "no:cacheprovider",
               f"--junitxml={os.path.join(self.out, f'junit_{part.key}.xml')}"]
        if _has_module(self.python, "pytest_timeout"):
            # a hung test fails with its stack before the part's deadline takes the whole group
            cmd.append(f"--timeout={int(max(10.0, timeout - 15))}")
        return cmd, ids  # -s: the tests' own output streams to log.txt as it comes

    def why_skipped(self, part: Part) -> str | None:
        if self.device == "cpu" and not part.on_cpu:
            return "not rehearsed on a CPU"
        if self.device == "cuda" and part.min_gpus > self.gpus:  # self.gpus: what part a found
            return f"needs {part.min_gpus} GPUs, {self.gpus} visible"
        if self.left() < part.min_s:
            return f"{self.left():.0f} s of the budget left, {part.min_s:.0f} s needed"
        return None

    def run_part(self, part: Part) -> dict:
        row = {"part": part.key, "name": part.name, "what": part.what}
        why = self.why_skipped(part)
        if why:
            self.log(f"[gpu_check] part {part.key} ({part.name}) skipped: {why}")
            return {**row, "status": "skipped", "why": why}
        timeout = min(part.cap_s, self.left())
        cmd, ids = self.command(part, timeout)
        self.log(f"[gpu_check] part {part.key} ({part.name}), at most {timeout:.0f} s: {part.what}")
        run = run_command(cmd, timeout, self.log, self.env(part))
        row.update(run, problems=[])
        if run["rc"] is None:
            row["problems"].append(f"ran past its {timeout:.0f} s deadline")
        if not run["group_gone"]:
            row["problems"].append("processes of the part were still alive 30 s after it ended")
        left = gpu_processes() if self.device == "cuda" else None
        if left:
            row["problems"].append(f"the GPU still runs {left} after the part")
        if ids:
            self._judge_tests(part, ids, row)
        else:
            self._judge_benchmark(part, row)
        row["figures"] = _read_jsonl(os.path.join(self.out, f"figures_{part.key}.jsonl")) + row.get("figures", [])
        row["problems"] += [f"{f['figure']} = {f['value']:.4g}, bound {f['bound']:.4g} ({f.get('test', '')})"
                            for f in row["figures"] if not f["ok"]]
        if run["rc"] not in (0, None) and not row["problems"]:
            row["problems"].append(f"exited {run['rc']}")
        row["status"] = "failed" if row["problems"] else "passed"
        self.log(f"[gpu_check] part {part.key} ({part.name}): {row['status']} in {run['seconds']:.0f} s"
                 + "".join(f"\n  - {p}" for p in row["problems"]))
        return row

    def _judge_tests(self, part: Part, ids: list[str], row: dict) -> None:
        xml = os.path.join(self.out, f"junit_{part.key}.xml")
        tests = junit_results(xml) if os.path.exists(xml) else []
        row["tests"] = tests
        passed = sum(t["status"] == "passed" for t in tests)
        row["problems"] += [f"{t['name']} failed: {t['detail'][:500]}" for t in tests if t["status"] == "failed"]
        row["problems"] += [f"{t['name']} skipped: {t['detail'][:300]}" for t in tests if t["status"] == "skipped"]
        if passed < len(ids):
            row["problems"].append(f"{passed} of the {len(ids)} tests it names passed")

    def _judge_benchmark(self, part: Part, row: dict) -> None:
        path = os.path.join(self.out, f"bench_{part.key}.json")
        if not os.path.exists(path):
            row["problems"].append("wrote no benchmark JSON")
            return
        with open(path) as f:
            bench = json.load(f)
        row["benchmark"] = {s: bench.get(s) for s in part.sections}
        missing = [s for s in part.sections if not bench.get(s)]
        if missing:
            row["problems"].append(f"no rows for {', '.join(missing)}")
        row["figures"] = judge(bench, self.device)

    def run(self, keys: list[str] | None = None) -> dict:
        self.log(f"[gpu_check] device {self.device}, budget {self.budget_s:.0f} s, out {self.out}, python "
                 f"{self.python}")
        self.save()
        for part in PARTS:
            if keys and part.key not in keys:
                continue
            row = self.run_part(part)
            self.results["parts"].append(row)
            if part.key == "a":
                self._after_environment(row)
            self.save()
            if self.results.get("stop"):
                break
        parts = self.results["parts"]
        self.results["ok"] = bool(parts) and all(p["status"] != "failed" for p in parts) \
            and not self.results.get("stop")
        self.save()
        counts = {s: sum(p["status"] == s for p in parts) for s in ("passed", "failed", "skipped")}
        self.log(f"[gpu_check] {counts['passed']} parts passed, {counts['failed']} failed, {counts['skipped']} "
                 f"skipped in {self.results['seconds']:.0f} s: {'OK' if self.results['ok'] else 'FAILED'}; "
                 f"{os.path.join(self.out, 'results.json')}")
        return self.results

    def _after_environment(self, row: dict) -> None:
        env = ((row.get("benchmark") or {}).get("environment") or [{}])[0]
        self.results["environment"] = env
        self.gpus = int(env.get("gpus") or 0)
        if self.device == "cuda" and not self.gpus:
            self.results["stop"] = ("CUDA is not available to this PyTorch "
                                    f"({env.get('torch', 'not importable')}): a CPU-only PyTorch on a GPU node, or "
                                    "no GPU visible (CUDA_VISIBLE_DEVICES). Nothing on the GPU was checked; "
                                    "--device cpu rehearses the check on a CPU")
            self.log(f"[gpu_check] FAILED: {self.results['stop']}")


def judge(bench: dict, device: str) -> list[dict]:
    """The benchmark's figures that have a bound: [{figure, value, bound, ok}]."""
    out = []

    def bound(figure: str, value, limit: float, below: bool = True):
        if isinstance(value, (int, float)):
            out.append({"figure": figure, "value": value, "bound": limit,
                        "ok": value <= limit if below else value >= limit})

    for env in bench.get("environment") or []:
        if device == "cuda" and env.get("datasheet_tflops"):
            bound("matmul TFLOP/s over the datasheet's", env.get("matmul_tflops", 0) / env["datasheet_tflops"],
                  MATMUL_FLOOR_OF_DATASHEET, below=False)
    for r in bench.get("mfu") or []:  # above 1 only a peak that read low can give
        bound(f"mfu {r.get('model')}", r.get("mfu"), 1.0)
    for r in bench.get("long_context") or []:
        if "error" in r:
            bound(f"long-context prediction error {r['model']} {r['context']}", abs(r["error"]),
                  LONG_CONTEXT_ERROR_BOUND)
    return out


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _has_module(python: str, name: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def gpu_processes() -> list[str] | None:
    """The compute processes nvidia-smi lists (None without nvidia-smi)."""
    if shutil.which("nvidia-smi") is None:
        return None
    res = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return [line for line in res.stdout.splitlines() if line.strip()]
