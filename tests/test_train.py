"""Real LoRA runs on the tiny model through the child-process entry point: stages, warm start, resume, OOM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.config import EvaluateConfig
from pipelines.evaluate.gate import EvalReport
from runs import END, fim_rows, kto_rows, make_run, pair_rows, run_module, train_config
from support import ROOT


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def lora(folder: Path) -> dict[str, torch.Tensor]:
    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "adapter.safetensors"
    return load_file(str(folder / name))


def test_lora_weights_changed_and_base_weights_did_not(strong_run: Path, tiny_model: Path) -> None:
    before = digest(tiny_model)
    tensors = lora(strong_run / "adapter")
    assert tensors and all("lora_" in k for k in tensors)  # the adapter holds only LoRA weights
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    # peft initialises every lora_B to zero; training must have moved them.
    assert lora_b and all(t.abs().sum().item() > 0 for t in lora_b)
    assert digest(tiny_model) == before  # the base model's files are untouched
    config = json.loads((strong_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == str(tiny_model)


def test_sft_then_dpo_on_one_adapter(strong_run: Path) -> None:
    metrics = json.loads((strong_run / "train.json").read_text())
    sft, dpo = metrics["stages"]
    assert (sft["name"], dpo["name"]) == ("sft", "dpo") and metrics["steps"] == 120 + 12
    assert sft["loss"] < sft["first_loss"] * 0.6  # the middles were learned
    assert dpo["metric"] is not None and 0.0 <= dpo["metric"] <= 1.0  # reward accuracy over the stage
    assert metrics["device"] == "cpu" and metrics["tokens"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["rows"]["dpo"] == {"rows": 32, "new": 32, "replayed": 0}
    # DPO continued from SFT's adapter (its reference) and moved it further
    after_sft, final = lora(strong_run / "checkpoints" / "sft" / "done"), lora(strong_run / "adapter")
    assert set(after_sft) == set(final)
    assert any(not torch.equal(after_sft[k], final[k]) for k in final)
    progress = json.loads((strong_run / "progress.json").read_text())
    assert (progress["stage"], progress["step"], progress["max_steps"]) == ("dpo", 12, 12)
    assert progress["stage_index"] == progress["stages"] == 2 and progress["pairs_per_s"] > 0
    assert not (strong_run / "adapter.partial").exists()


def test_kto_runs_when_only_unpaired_labels_exist_and_chat_rows_need_a_template(tmp_path: Path,
                                                                               tiny_model: Path) -> None:
    chat = [{"id": "c1", "signal": "edit", "developer": "a", "ts": "2026-10-02T00:00:00",
             "prompt": [{"role": "user", "content": "rename x"}],
             "completion": [{"role": "assistant", "content": "y"}]}]
    run_dir = make_run(tmp_path / "run", tiny_model, train_config(max_steps=3, preference_max_steps=3,
                                                                  min_preference_rows=8),
                       {"sft.jsonl": fim_rows(16, seed=4), "kto.jsonl": kto_rows(24, seed=5), "chat.jsonl": chat},
                       manifest={"kto": {"desirable_weight": 2.0, "undesirable_weight": 1.0}})
    run_module("pipelines.train", run_dir)
    metrics = json.loads((run_dir / "train.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["sft", "kto"] and "KTO on 24 rows" in metrics["preference"]
    assert any("chat.jsonl: 1 rows skipped: the base model's tokenizer has no chat template" in n
               for n in metrics["notes"])
    assert metrics["train_rows"] == 16


def test_kill_9_mid_training_then_rerun_resumes_from_the_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    cfg = train_config(max_steps=200, checkpoint_every_steps=4, lora_dropout=0.1)
    files = {"sft.jsonl": fim_rows(64, seed=6)}
    run_dir = make_run(tmp_path / "killed", tiny_model, cfg, files)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.train", str(run_dir)], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = run_dir / "checkpoints" / "sft"
    deadline = time.monotonic() + 240
    while not list(checkpoints.glob("step-*")) or _step(run_dir) < 9:
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "adapter").exists() and not (run_dir / "train.json").exists()
    saved = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
    assert saved >= 8 and saved % 4 == 0

    result = run_module("pipelines.train", run_dir)
    metrics = json.loads((run_dir / "train.json").read_text())
    assert metrics["resumed_from_step"] == {"sft": saved} and metrics["steps"] == 200
    assert f"stage sft resumes at step {saved}/200" in result.stdout
    # The resumed run ends where an uninterrupted one does: same data order, optimizer state, dropout RNG.
    whole = make_run(tmp_path / "whole", tiny_model, cfg, files)
    run_module("pipelines.train", whole)
    resumed, reference = lora(run_dir / "adapter"), lora(whole / "adapter")
    assert set(resumed) == set(reference)
    for k in reference:  # bit for bit: a resume replays the same arithmetic
        assert torch.equal(resumed[k], reference[k]), k


def _step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["step"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_warm_start_continues_an_adapter_on_new_rows_plus_replay(tmp_path: Path, strong_run: Path,
                                                                 tiny_model: Path) -> None:
    old, new = fim_rows(40, seed=7, start_day=1), fim_rows(12, seed=8, start_day=21)
    boundary = old[-1]["ts"]
    run_dir = make_run(tmp_path / "warm", tiny_model, train_config(max_steps=1, learning_rate=1e-7, replay_share=0.25),
                       {"sft.jsonl": old + new}, init=str(strong_run / "adapter"), data_until=boundary)
    run_module("pipelines.train", run_dir)
    metrics = json.loads((run_dir / "train.json").read_text())
    assert metrics["init_adapter"] == str(strong_run / "adapter") and metrics["warm_start"].startswith("warm start")
    assert metrics["rows"]["sft"] == {"rows": 16, "new": 12, "replayed": 4}  # 12 * 0.25 / 0.75 = 4
    # one step at lr 1e-7 leaves the adapter where it started: the served adapter's weights, not a fresh LoRA
    start, after = lora(strong_run / "adapter"), lora(run_dir / "adapter")
    for k in start:
        torch.testing.assert_close(after[k], start[k], rtol=1e-3, atol=1e-5)


OOM_WRAPPER = r"""
import os, resource, sys, torch
from pipelines.train import train
from pipelines.train.train import attach_adapter, load_base_model, quiet_libraries, runtime
from pipelines.train.rundir import RunConfig
# Warm up everything training will touch (imports, allocator, threads), then cap the data segment: from
# here on, allocations beyond the budget fail as they would on a full machine (the CPU allocator's error).
quiet_libraries()
torch.set_num_threads(2)
from pathlib import Path
run = RunConfig.read(Path(sys.argv[1]))
rt = runtime(run.train)
model, _, _ = attach_adapter(load_base_model(run.base_model, run.train, rt), run.train, None)
model(input_ids=torch.ones((1, 64), dtype=torch.long)).logits.sum().backward()
del model
data_kb = int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1])
limit = data_kb * 1024 + int(sys.argv[2]) * 2**20
resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
sys.exit(train.main([sys.argv[1]]))
"""


def long_rows(n: int) -> list[dict[str, str]]:
    """Rows of ~1,900 tokens: per-row activations (~30 MB here) dwarf the allocator's noise."""
    return [{**r, "prompt": r["prompt"].replace("(x):\n", "(x):\n" + "    x = x + 1\n" * 200),
             "completion": "    return x\n" * 100 + END} for r in fim_rows(n, seed=9)]


# glibc's mmap threshold is pinned (128 KB): by default it rises after each freed big block, so later tensors come
# from the heap, whose free pieces stay counted against the limit. With it floating, the same budget ended anywhere
# from an error to 4 rows on one machine (180 MB failed at one row in CI once); pinned, two runs per budget agreed:
# 50 MB -> 1 row, 70-90 -> 2, 110-150 -> 4, 180 and up -> 8. 130 MB is the middle of the four-row band. The thread
# count is pinned too: each OpenMP thread adds its own buffers (with 16 threads, 110 MB failed even at one row).
@pytest.mark.parametrize(("budget_mb", "fits"), [(130, True), (12, False)])
def test_out_of_memory_halves_the_micro_batch_or_says_what_to_do(tmp_path: Path, tiny_model: Path,
                                                                 budget_mb: int, fits: bool) -> None:
    run_dir = make_run(tmp_path / "oom", tiny_model, train_config(max_steps=1, batch_size=8),
                       {"sft.jsonl": long_rows(8)})
    config = json.loads((run_dir / "config.json").read_text())
    config["max_row_tokens"] = 2048
    (run_dir / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, "-c", OOM_WRAPPER, str(run_dir), str(budget_mb)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "2",
                                 "MALLOC_MMAP_THRESHOLD_": "131072"})
    if fits:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        metrics = json.loads((run_dir / "train.json").read_text())
        assert metrics["oom_backoffs"] >= 1 and metrics["micro_batch"] < 8 and metrics["steps"] == 1
        assert "out of memory at sft step 1: micro-batch halved to 4 rows (2 micro-steps per step)" in result.stdout
    else:
        assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
        assert "out of memory with one row" in result.stdout and "max_row_tokens" in result.stdout
        assert not (run_dir / "adapter").exists()


def test_evaluation_scores_base_candidate_and_served(strong_run: Path, tmp_path: Path) -> None:
    # Serve the same adapter as the "champion": every score must equal the candidate's exactly.
    config = json.loads((strong_run / "config.json").read_text())
    config["served_adapter"] = str(strong_run / "adapter")
    (tmp_path / "run").mkdir()
    for name in ("data", "adapter"):
        os.symlink(strong_run / name, tmp_path / "run" / name)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    run_module("pipelines.evaluate", tmp_path / "run")
    report = EvalReport.load(tmp_path / "run" / "eval.json")
    assert report.rows == 32 and report.tokens > 0 and report.pair_rows == 24 and report.generated_rows == 24
    assert report.served == report.candidate
    assert report.candidate.heldout_loss < report.base.heldout_loss  # the adapter learned the rule
    assert report.candidate.edit_similarity is not None and report.base.edit_similarity is not None
    assert report.candidate.edit_similarity > report.base.edit_similarity
    assert 0 < report.reference_tokens < 16 and report.generated_rows_per_s > 0
    assert isinstance(EvaluateConfig().max_new_tokens, int)


def test_two_processes_under_torchrun_train_what_one_process_trains_with_both_batches(tmp_path: Path,
                                                                                    tiny_model: Path) -> None:
    # The entry point under a launcher (as under `accelerate launch` on GPUs; gloo here): each process
    # takes half of every step's rows, and the summed gradients equal one process with the whole batch.
    files = {"sft.jsonl": fim_rows(48, seed=10), "dpo.jsonl": pair_rows(16, seed=11)}
    settings = {"max_steps": 4, "preference_max_steps": 2, "min_preference_rows": 8, "preference_learning_rate": 3e-3}
    one = make_run(tmp_path / "one", tiny_model, train_config(batch_size=8, **settings), files)
    two = make_run(tmp_path / "two", tiny_model, train_config(batch_size=4, **settings), files)
    run_module("pipelines.train", one)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "pipelines.train", str(two)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    a, b = json.loads((one / "train.json").read_text()), json.loads((two / "train.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    for x, y in zip(a["stages"], b["stages"], strict=True):
        assert x["tokens"] == y["tokens"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    single, double = lora(one / "adapter"), lora(two / "adapter")
    for k in single:
        torch.testing.assert_close(double[k], single[k], rtol=1e-3, atol=1e-4)


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    run_dir = make_run(tmp_path / "stopped", tiny_model, train_config(max_steps=400, checkpoint_every_steps=1000),
                       {"sft.jsonl": fim_rows(32, seed=12)})
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.train", str(run_dir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while _step(run_dir) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]  # pipelines.train.EXIT_STOPPED
    saved = [p.name for p in (run_dir / "checkpoints" / "sft").glob("step-*")]
    assert len(saved) == 1 and 3 <= int(saved[0].split("-")[1]) < 400  # where it stopped, not a scheduled one
    assert "the next attempt resumes there" in out and not (run_dir / "adapter").exists()


def test_a_run_whose_service_died_stops_with_a_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    # kill -9 of the service leaves its training child running (it leads its own process group); the
    # restarted service resumes the run, so the orphan must stop rather than write into the same folder.
    run_dir = make_run(tmp_path / "orphan", tiny_model, train_config(max_steps=400, checkpoint_every_steps=1000),
                       {"sft.jsonl": fim_rows(32, seed=13)})
    service = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.train", str(run_dir)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "DEVTUNE_SUPERVISOR_PID": str(service.pid)})
    deadline = time.monotonic() + 120
    while _step(run_dir) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    service.kill()
    service.wait()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75 and f"the service (pid {service.pid}) that started this run is gone" in out
    assert len(list((run_dir / "checkpoints" / "sft").glob("step-*"))) == 1
