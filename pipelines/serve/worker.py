"""The builtin backend's worker: `python -m pipelines.serve.worker --base-model M`, started by the gateway.

A child process, like training: it imports torch, transformers and peft, which the gateway never does, and
a crash here cannot take the gateway down (it starts a new worker). It speaks JSON lines: requests on
stdin, events on stdout (pipelines/serve/builtin.py is the other end); its log goes to stderr. It exits
when stdin closes, so it never outlives the process that started it.

    in:  {"op": "complete", "id", "prompt", "adapter": {"name", "path"} | null, "max_tokens", "temperature",
          "top_p", "stop": [...]}                   {"op": "cancel", "id"}
    out: {"event": "ready", ...}   then per request: {"id", "event": "started", "adapter": name | null, "note"}
         {"id", "event": "delta", "text"} ...  {"id", "event": "finished", "finish_reason", "prompt_tokens",
         "completion_tokens"}   or {"id", "event": "error", "error"}

Adapters of one base are loaded side by side by served name (peft `load_adapter`), on first use: served
names are never reused, so a name is never reloaded, and a promotion needs no restart. At most
`--max-adapters` stay loaded; the least recently used goes. Requests waiting when a batch starts are
completed together, each with its own adapter (peft's mixed-adapter batches: `adapter_names=` per row,
"__base__" for the base model), left-padded, decoding one token per step for every row with a KV cache.
A row that ends leaves the batch (its cache rows are dropped), so a long completion does not make short
ones wait; requests that arrive meanwhile wait for the next batch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import queue
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.tokens import TokenizerError, find_fim_tokens
from pipelines.train.train import pick_device, quiet_libraries

log = logging.getLogger("devtune.serve.worker")

BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
CANCEL_KEEP_S = 60.0


@dataclass
class Row:
    """One request in a running batch."""

    id: str
    ids: list[int]  # the prompt's tokens
    adapter: str  # a loaded adapter's name, or BASE
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    out: list[int] = field(default_factory=list)  # generated tokens
    sent: int = 0  # characters of the decoded completion already emitted


class Worker:
    def __init__(self, base_model: str, device: str, max_adapters: int, emit: Any):
        self.emit = emit
        self.device = torch.device(pick_device(device))
        self.tokenizer = AutoTokenizer.from_pretrained(base_model)
        dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype).to(self.device).eval()
        self.model: Any = None  # a PeftModel around `base` once the first adapter is loaded
        # served name -> peft's name for it, least recently used first. peft refuses "." in a name (it becomes
        # a module name), and served names have dots (emails), so peft gets "a<n>", never reused either.
        self.loaded: OrderedDict[str, str] = OrderedDict()
        self.loads = 0
        self.max_adapters = max_adapters
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else (self.tokenizer.eos_token_id or 0)
        self.max_positions = int(getattr(self.base.config, "max_position_embeddings", 0) or 1 << 20)
        self.end_ids = self._end_ids(base_model)
        # transformers 5.2x renamed the KV cache argument and output past_key_values -> cache.
        self.cache_name = "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        self.cancelled: dict[str, float] = {}  # request id -> when its cancel arrived
        self.cancel_lock = threading.Lock()

    def _end_ids(self, base_model: str) -> set[int]:
        """The end of a FIM middle: the family's end token and eos; a FIM sentinel would start garbage."""
        vocab = self.tokenizer.get_vocab()
        ends = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        try:
            fim = find_fim_tokens(vocab, self.tokenizer.eos_token or "", base_model)
            ends |= {vocab[t] for t in (fim.eos, fim.prefix, fim.suffix, fim.middle) if t in vocab}
        except TokenizerError as e:
            log.warning("%s: serving without FIM end tokens", e)
        return ends

    # -- the loop ---------------------------------------------------------------------------------------------

    def serve(self, inbox: queue.Queue[dict[str, Any] | None], max_batch: int, window_s: float) -> None:
        """Complete batches of what `inbox` holds until it yields None (stdin closed)."""
        while True:
            first = inbox.get()
            if first is None:
                return
            batch, closing = [first], False
            deadline = time.monotonic() + window_s
            while len(batch) < max_batch:
                try:
                    item = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    break
                batch.append(item)
            try:
                self.run(batch)
            except Exception as e:  # one batch's failure answers its requests; the worker goes on
                log.exception("batch of %d failed", len(batch))
                for request in batch:
                    self.emit({"id": request["id"], "event": "error", "error": f"{type(e).__name__}: {e}"})
            if closing:
                return

    def cancel(self, request_id: str) -> None:
        now = time.monotonic()
        with self.cancel_lock:
            # A cancel can cross its request's last event; one that found nothing to stop is forgotten.
            self.cancelled = {i: t for i, t in self.cancelled.items() if now - t < CANCEL_KEEP_S}
            self.cancelled[request_id] = now

    def _take_cancelled(self, request_id: str) -> bool:
        with self.cancel_lock:
            return self.cancelled.pop(request_id, None) is not None

    def run(self, batch: list[dict[str, Any]]) -> None:
        rows = []
        wanted = {r["adapter"]["name"] for r in batch if r.get("adapter")}
        for request in batch:
            if self._take_cancelled(request["id"]):
                self._finish(request["id"], "cancelled", 0, 0)
                continue
            adapter, note = self.attach(request.get("adapter"), wanted)
            self.emit({"id": request["id"], "event": "started", "adapter": None if adapter == BASE else adapter,
                       "note": note})
            max_tokens = max(1, int(request["max_tokens"]))
            ids = self.tokenizer(request["prompt"])["input_ids"] or [self.pad_id]
            room = max(1, self.max_positions - max_tokens)
            rows.append(Row(id=request["id"], ids=ids[-room:], adapter=adapter, max_tokens=max_tokens,
                            temperature=float(request.get("temperature") or 0.0),
                            top_p=float(request.get("top_p") or 1.0), stop=tuple(request.get("stop") or ())))
        for group in length_groups(rows):
            self.generate(group)

    # -- adapters ---------------------------------------------------------------------------------------------

    def attach(self, adapter: dict[str, str] | None, keep: set[str]) -> tuple[str, str]:
        """The served name to answer a request with (its adapter loaded on first use), or BASE, and a note when
        the adapter asked for could not be used."""
        if adapter is None:
            return BASE, ""
        name, path = adapter["name"], adapter["path"]
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return name, ""
        started = time.monotonic()
        internal = f"a{self.loads}"
        try:
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=internal, is_trainable=False)
                self.model.eval()
            else:
                self.model.load_adapter(path, adapter_name=internal, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            log.error("adapter %s (%s) could not be loaded: %s", name, path, e)
            return BASE, f"adapter {name} could not be loaded ({type(e).__name__}); answered by the base model"
        self.loads += 1
        self.loaded[name] = internal
        log.info("loaded adapter %s from %s in %.2fs (%d loaded)", name, path, time.monotonic() - started,
                 len(self.loaded))
        while len(self.loaded) > self.max_adapters:
            old = next((n for n in self.loaded if n not in keep and n != name), None)
            if old is None:
                break
            self.model.delete_adapter(self.loaded.pop(old))
            log.info("unloaded adapter %s (least recently used of %d)", old, self.max_adapters + 1)
        return name, ""

    # -- generation -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, rows: list[Row]) -> None:
        width = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r.ids):] = torch.tensor(r.ids)
            attention[i, width - len(r.ids):] = 1
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        lm = self.model if self.model is not None else self.base
        # logits_to_keep=1: the LM head runs on the last position only, not on the whole prompt.
        out = lm(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                 logits_to_keep=1, **self._adapter_kwargs(rows))
        while True:
            chosen = self._choose(out.logits[:, -1, :].float(), rows)
            keep = [i for i, (r, token) in enumerate(zip(rows, chosen, strict=True)) if self._step(r, token)]
            if not keep:
                return
            cache = getattr(out, self.cache_name)
            if len(keep) < len(rows):  # finished rows leave the batch and its cache
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention, positions = attention[index], positions[index]
                chosen = [chosen[i] for i in keep]
                rows = [rows[i] for i in keep]
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=1)
            positions = positions[:, -1:] + 1
            out = lm(input_ids=torch.tensor(chosen, device=self.device)[:, None], attention_mask=attention,
                     position_ids=positions, use_cache=True, logits_to_keep=1,
                     **{self.cache_name: cache}, **self._adapter_kwargs(rows))

    def _adapter_kwargs(self, rows: list[Row]) -> dict[str, Any]:
        if self.model is None:
            return {}
        return {"adapter_names": [self.loaded.get(r.adapter, BASE) for r in rows]}

    def _choose(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:
        greedy = logits.argmax(dim=-1).tolist()
        chosen = []
        for i, r in enumerate(rows):
            if r.temperature <= 1e-5:
                chosen.append(int(greedy[i]))
                continue
            probs = torch.softmax(logits[i] / r.temperature, dim=-1)
            if r.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                drop = sorted_probs.cumsum(-1) - sorted_probs > r.top_p
                probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
            chosen.append(int(torch.multinomial(probs, 1).item()))
        return chosen

    def _step(self, r: Row, token: int) -> bool:
        """Take one generated token for `r`; emit what became final; False when the row is finished."""
        if self._take_cancelled(r.id):
            self._finish(r.id, "cancelled", len(r.ids), len(r.out))
            return False
        if token in self.end_ids:
            self._flush(r, self._text(r))
            self._finish(r.id, "stop", len(r.ids), len(r.out))
            return False
        r.out.append(token)
        text = self._text(r)
        cut = min((i for i in (text.find(s, max(0, r.sent - len(s))) for s in r.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self._flush(r, text[:cut])
            self._finish(r.id, "stop", len(r.ids), len(r.out))
            return False
        if len(r.out) >= r.max_tokens:
            self._flush(r, text)
            self._finish(r.id, "length", len(r.ids), len(r.out))
            return False
        # Hold back what could still become a stop string, and a character whose bytes are incomplete.
        hold = max((len(s) - 1 for s in r.stop), default=0)
        safe = len(text.rstrip("\ufffd")) - hold
        if safe > r.sent:
            self.emit({"id": r.id, "event": "delta", "text": text[r.sent:safe]})
            r.sent = safe
        return True

    def _text(self, r: Row) -> str:
        text: str = self.tokenizer.decode(r.out, skip_special_tokens=False)
        return text

    def _flush(self, r: Row, text: str) -> None:
        text = text.rstrip("\ufffd")
        if len(text) > r.sent:
            self.emit({"id": r.id, "event": "delta", "text": text[r.sent:]})
            r.sent = len(text)

    def _finish(self, request_id: str, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.emit({"id": request_id, "event": "finished", "finish_reason": reason, "prompt_tokens": prompt_tokens,
                   "completion_tokens": completion_tokens})


def length_groups(rows: list[Row], max_padding: float = 0.25) -> list[list[Row]]:
    """Rows of similar prompt length together, shortest first. A batch is left-padded to its longest prompt and
    the prompt's forward pass is most of a completion's cost on a CPU (about 270 prompt tokens for 16 generated
    in bench/gateway.py): 16 prompts of 40-500 tokens padded together cost 1.8x their own tokens. A group
    takes rows until padding would add more than `max_padding` of its real tokens. Measured on the bench
    model, 16 such requests: 1.53 s grouped against 1.73 s padded together (medians of 6, alternating)."""
    groups: list[list[Row]] = []
    for row in sorted(rows, key=lambda r: len(r.ids)):
        group = groups[-1] if groups else None
        if group is not None:
            real = sum(len(r.ids) for r in group) + len(row.ids)
            if len(row.ids) * (len(group) + 1) <= real * (1 + max_padding):
                group.append(row)
                continue
        groups.append([row])
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.serve.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=2.0)
    parser.add_argument("--max-adapters", type=int, default=32)
    parser.add_argument("--cpu-threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args(argv)
    if args.cpu_threads > 0:
        torch.set_num_threads(args.cpu_threads)
    # The protocol owns the real stdout; anything a library prints goes to the log (stderr) instead.
    protocol: TextIO = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    quiet_libraries()  # its log lines go to sys.stdout, which now writes to stderr
    write_lock = threading.Lock()

    def emit(message: dict[str, Any]) -> None:
        line = json.dumps(message, ensure_ascii=False)
        with write_lock:
            protocol.write(line + "\n")
            protocol.flush()

    started = time.monotonic()
    worker = Worker(args.base_model, args.device, args.max_adapters, emit)
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()

    def read() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            message = json.loads(line)
            if message.get("op") == "cancel":
                worker.cancel(message["id"])
            else:
                inbox.put(message)
        inbox.put(None)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    log.info("serving %s on %s (pid %d, loaded in %.1fs)", args.base_model, worker.device, os.getpid(),
             time.monotonic() - started)
    emit({"event": "ready", "base_model": args.base_model, "device": str(worker.device),
          "load_s": round(time.monotonic() - started, 2), "pid": os.getpid()})
    worker.serve(inbox, args.max_batch_size, args.batch_window_ms / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
