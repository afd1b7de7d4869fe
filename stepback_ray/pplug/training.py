"""``stepback train-pplug``: train the Persona-Plug projector on a LaMP training set, with the LLM frozen.

Each training example is one user's query: the soft tokens computed from the user's history embeddings and the
query's embedding, then the task prompt (the ``none`` prompt of the pipeline: instruction and input), then the
gold output. The loss is next-token cross-entropy on the gold tokens only; gradients flow through the frozen LLM
into the projectors (and the instruction vector). The encoder is frozen too, so item and query embeddings are
computed once up front. Validation loss is measured on held-out users every ``eval_every`` steps; the curve is
saved as JSON and PNG next to the checkpoint, which holds the weights and the config needed to serve them.

Training resumes. At every validation point the full training state (weights, optimizer, schedule, the shuffled
order still to visit, both random generators, the loss history) is written to ``checkpoint/resume.pt`` under the
job's output, so a rerun with the same ``run_id`` continues from the last snapshot and ends with the same weights
an uninterrupted run would have; a rerun of a finished run returns its summary. A snapshot made with other
training settings is refused with a clear error instead of being mixed in.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from stepback_ray.config import JobSpec, RetrievalConfig
from stepback_ray.data import read_lamp
from stepback_ray.data.rows import Query, most_recent_first
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.engines.models import resolve_model
from stepback_ray.errors import StepbackError
from stepback_ray.generation.prompting import fit_prompt
from stepback_ray.pplug.encoder import TextEncoder, item_text
from stepback_ray.pplug.model import PersonaPlug
from stepback_ray.storage import RunStore
from stepback_ray.tasks import get_task

CHECKPOINT = "checkpoint/pplug.pt"
CHECKPOINT_CONFIG = "checkpoint/pplug.json"
RESUME = "checkpoint/resume.pt"


@dataclass
class Example:
    query_vec: np.ndarray
    item_vecs: np.ndarray
    prompt_ids: list[int]
    target_ids: list[int]


def user_items(query: Query, max_items: int) -> list[dict[str, str]]:
    return most_recent_first(query.history)[:max_items]


def build_examples(queries: list[Query], job: JobSpec, tools: PromptFormatter, encoder: TextEncoder) -> list[Example]:
    """Encode every query and history item once and tokenize prompts and golds."""
    task = get_task(job.task)
    cfg = job.pplug
    items = [user_items(q, cfg.max_items) for q in queries]
    flat = [item_text(task, it) for its in items for it in its]
    vecs = encoder.encode(flat)
    qvecs = encoder.encode([task.query_text(q.input) for q in queries])
    eos = tools.tokenizer.eos_token or ""
    out, k = [], 0
    for q, its, qv in zip(queries, items, qvecs):
        n = len(its)
        text = tools.truncate(q.input, cfg.max_input_tokens)
        prompt = fit_prompt(task, tools, text, None, [], RetrievalConfig(), 32).text
        out.append(Example(qv, vecs[k : k + n], tools.encode(prompt), tools.encode((q.gold or "") + eos)))
        k += n
    return out


def collate(batch: list[Example], pad_id: int):
    import torch

    n_max = max(1, max(len(e.item_vecs) for e in batch))
    d = batch[0].query_vec.shape[0]
    items = torch.zeros(len(batch), n_max, d)
    mask = torch.zeros(len(batch), n_max, dtype=torch.bool)
    for i, e in enumerate(batch):
        if len(e.item_vecs):
            items[i, : len(e.item_vecs)] = torch.from_numpy(e.item_vecs)
            mask[i, : len(e.item_vecs)] = True
        else:  # no history: attend to a zero vector (the persona token is then the projector's bias)
            mask[i, 0] = True
    query = torch.from_numpy(np.stack([e.query_vec for e in batch]))
    seqs = [e.prompt_ids + e.target_ids for e in batch]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (e, s) in enumerate(zip(batch, seqs)):  # right padding: positions count from 0 as in training data
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        labels[i, len(e.prompt_ids) : len(s)] = torch.tensor(e.target_ids)
    return query, items, mask, ids, attn, labels


def plug_loss(llm, plug: PersonaPlug, batch, pad_id: int):
    """Mean next-token cross-entropy of the gold tokens with [I; P] in front of the prompt."""
    import torch

    query, items, mask, ids, attn, labels = collate(batch, pad_id)
    soft = plug(query, items, mask)
    embeds = torch.cat([soft, llm.get_input_embeddings()(ids)], dim=1)
    attn = torch.cat([torch.ones(len(batch), soft.shape[1], dtype=attn.dtype), attn], dim=1)
    labels = torch.cat([torch.full((len(batch), soft.shape[1]), -100, dtype=labels.dtype), labels], dim=1)
    return llm(inputs_embeds=embeds, attention_mask=attn, labels=labels).loss


def save_checkpoint(store: RunStore, plug: PersonaPlug, meta: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(plug.state_dict(), buf)
    store.write_bytes(CHECKPOINT, buf.getvalue())
    store.write_json(CHECKPOINT_CONFIG, {**plug.config(), **meta})


def checkpoint_config(uri: str, storage) -> dict[str, Any]:
    """The config saved with a trained plug: its encoder, LLM and sizes."""
    store = RunStore(uri, storage)
    if not store.exists(CHECKPOINT_CONFIG):
        raise StepbackError(
            f"{uri}: no Persona-Plug checkpoint ({CHECKPOINT_CONFIG}); train one with `stepback train-pplug`"
        )
    meta = store.read_json(CHECKPOINT_CONFIG)
    meta.setdefault("encoder_max_tokens", 256)  # checkpoints from before the setting used the encoder's 256
    return meta


def load_checkpoint(uri: str, storage) -> tuple[PersonaPlug, dict[str, Any]]:
    """A trained plug and its config from a training run's output (or a copy of its ``checkpoint/`` folder)."""
    import torch

    store = RunStore(uri, storage)
    meta = checkpoint_config(uri, storage)
    plug = PersonaPlug(meta["d_enc"], meta["d_llm"], meta["target_norm"])
    plug.load_state_dict(torch.load(io.BytesIO(store.read_bytes(CHECKPOINT)), map_location="cpu"))
    return plug.eval(), meta


def plot_losses(store: RunStore, history: dict[str, list]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(history["train_step"], history["train_loss"], alpha=0.4, label="train (per step)")
    ax.plot(history["val_step"], history["val_loss"], marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy of the gold output")
    ax.set_title("Persona-Plug training")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    store.write_bytes("loss.png", buf.getvalue())


def training_fingerprint(job: JobSpec) -> str:
    """What makes two training runs the same run: the plug's settings (``checkpoint`` is what is served, not
    trained), the LLM, the task and the thread count (which changes float sums, hence the weights)."""
    settings = job.pplug.model_dump(mode="json", exclude={"checkpoint"})
    blob = json.dumps(
        {"pplug": settings, "model": job.engine.model, "task": job.task, "threads": job.engine.threads}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_resume_state(store: RunStore, state: dict[str, Any]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    store.write_bytes(RESUME, buf.getvalue())


def load_resume_state(store: RunStore, fingerprint: str) -> dict[str, Any] | None:
    """The last snapshot of this run, or None; a snapshot of other settings is an error, never mixed in."""
    import torch

    if not store.exists(RESUME):
        return None
    state = torch.load(io.BytesIO(store.read_bytes(RESUME)), map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint:
        raise StepbackError(
            f"{store.uri_of(RESUME)}: a training snapshot made with other settings (fingerprint "
            f"{state.get('fingerprint')}, this job {fingerprint}); train under a new run_id or "
            "delete that output"
        )
    return state


def finished_summary(store: RunStore, fingerprint: str) -> dict[str, Any] | None:
    """The summary of this run if it already finished with the same settings."""
    if not (store.exists("training.json") and store.exists(CHECKPOINT)):
        return None
    summary = store.read_json("training.json")["summary"]
    if "fingerprint" not in summary:
        raise StepbackError(
            f"{store.uri_of('training.json')}: this output holds a plug trained before runs recorded "
            "their settings, so it cannot be matched to this job; train under a new run_id"
        )
    if summary["fingerprint"] != fingerprint:
        raise StepbackError(
            f"{store.uri_of('training.json')}: this output holds a plug trained with other settings; "
            "train under a new run_id"
        )
    return summary


def train(job: JobSpec, log=print) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    cfg = job.pplug
    if not cfg.train_questions:
        raise StepbackError("pplug.train_questions is required for training")
    rng = random.Random(cfg.seed)  # the validation split and the visiting order; its state goes in each snapshot
    task = get_task(job.task)
    store = RunStore(job.output_uri, job.storage)
    store.ensure_writable()
    fingerprint = training_fingerprint(job)
    done = finished_summary(store, fingerprint)
    if done is not None:
        log(f"{store.uri}: already trained with these settings ({done['steps']} steps); nothing to do")
        store.remove(RESUME)  # left over when the run stopped between finishing and cleaning up
        return done
    t0 = time.time()
    train_q = read_lamp(cfg.train_questions, cfg.train_outputs, task, job.storage)
    if cfg.val_questions:
        val_q = read_lamp(cfg.val_questions, cfg.val_outputs, task, job.storage)[: cfg.val_users]
    else:
        rng.shuffle(train_q)
        val_q, train_q = train_q[: cfg.val_users], train_q[cfg.val_users :]
    if cfg.max_train_users:
        train_q = train_q[: cfg.max_train_users]
    if any(q.gold is None for q in train_q + val_q):
        raise StepbackError("Persona-Plug training needs golds: set pplug.train_outputs (and val_outputs)")
    tools = PromptFormatter(job.engine)
    encoder = TextEncoder(cfg.encoder, max_seq_length=cfg.encoder_max_tokens)
    train_ex = build_examples(train_q, job, tools, encoder)
    val_ex = build_examples(val_q, job, tools, encoder)
    log(f"encoded {len(train_ex)} training and {len(val_ex)} validation users in {time.time() - t0:.0f} s")

    torch.set_num_threads(job.engine.threads or torch.get_num_threads())
    llm = AutoModelForCausalLM.from_pretrained(resolve_model(job.engine.model), dtype=torch.float32).eval()
    for p in llm.parameters():
        p.requires_grad_(False)
    emb = llm.get_input_embeddings().weight
    torch.manual_seed(cfg.seed)  # here, not earlier: loading the encoder and the LLM may draw from torch's generator
    plug = PersonaPlug(encoder.dim, emb.shape[1], float(emb.norm(dim=1).mean()))
    pad = tools.tokenizer.pad_token_id
    opt = torch.optim.AdamW(plug.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, math.ceil(len(train_ex) * cfg.epochs / cfg.batch_size))
    warmup = max(1, int(0.05 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / max(1, steps - warmup))
    )

    def validate() -> float:
        plug.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(val_ex), cfg.batch_size):
                b = val_ex[i : i + cfg.batch_size]
                total += plug_loss(llm, plug, b, pad).item() * len(b)
                n += len(b)
        plug.train()
        return total / max(1, n)

    order: list[int] = []
    state = load_resume_state(store, fingerprint)
    if state is None:
        start, elapsed_before = 1, 0.0
        history: dict[str, list] = {"train_step": [], "train_loss": [], "val_step": [0], "val_loss": [validate()]}
        log(f"step 0/{steps}: validation loss {history['val_loss'][0]:.4f}")
    else:
        plug.load_state_dict(state["plug"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        order, history, start = state["order"], state["history"], state["step"] + 1
        elapsed_before = state["elapsed_s"]
        rng.setstate(state["python_random"])
        torch.set_rng_state(state["torch_random"])
        log(f"resuming from the snapshot at step {state['step']}/{steps}")
    resumed_from = start - 1
    plug.train()
    for step in range(start, steps + 1):
        if len(order) < cfg.batch_size:
            nxt = list(range(len(train_ex)))
            rng.shuffle(nxt)
            order += nxt
        batch = [train_ex[i] for i in order[: cfg.batch_size]]
        order = order[cfg.batch_size :]
        loss = plug_loss(llm, plug, batch, pad)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plug.parameters(), 1.0)
        opt.step()
        sched.step()
        history["train_step"].append(step)
        history["train_loss"].append(round(loss.item(), 5))
        if step % cfg.eval_every == 0 or step == steps:
            history["val_step"].append(step)
            history["val_loss"].append(validate())
            save_resume_state(
                store,
                {
                    "fingerprint": fingerprint,
                    "step": step,
                    "plug": plug.state_dict(),
                    "optimizer": opt.state_dict(),
                    "schedule": sched.state_dict(),
                    "order": order,
                    "history": history,
                    "python_random": rng.getstate(),
                    "torch_random": torch.get_rng_state(),
                    "elapsed_s": elapsed_before + time.time() - t0,
                },
            )
            log(
                f"step {step}/{steps}: train loss {loss.item():.4f}, validation loss {history['val_loss'][-1]:.4f}"
                f" ({time.time() - t0:.0f} s)"
            )
    meta = {
        "encoder": cfg.encoder,
        "encoder_max_tokens": cfg.encoder_max_tokens,
        "model": job.engine.model,
        "task": task.name,
        "max_items": cfg.max_items,
        "max_input_tokens": cfg.max_input_tokens,
        "prompt_family": tools.family,
        "steps": steps,
        "train_users": len(train_ex),
        "val_users": len(val_ex),
    }
    save_checkpoint(store, plug, meta)
    summary = {
        **meta,
        "val_loss_first": history["val_loss"][0],
        "val_loss_best": min(history["val_loss"]),
        "val_loss_last": history["val_loss"][-1],
        "wall_s": round(elapsed_before + time.time() - t0, 1),
        "checkpoint": store.uri_of("checkpoint"),
        "fingerprint": fingerprint,
        "resumed_from_step": resumed_from,
    }
    store.write_json("training.json", {"summary": summary, "history": history, "config": job.public_dict()})
    plot_losses(store, history)
    store.remove(RESUME)  # training.json marks the run finished; the snapshot has done its work
    return summary
