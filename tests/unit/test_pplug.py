"""Persona-Plug: the aggregator, soft-token placement in the engine, checkpoints, serving in the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stepback_ray.config import StorageConfig, load_job
from stepback_ray.engines import Request, SamplingParams
from stepback_ray.errors import StepbackError
from stepback_ray.pplug.model import PersonaPlug
from stepback_ray.pplug.training import load_checkpoint, save_checkpoint, train
from stepback_ray.storage import RunStore
from tests.support import FIXTURES, REPO, SAMPLE, lamp5_users


def _unit(v):
    v = torch.tensor(v, dtype=torch.float32)
    return v / v.norm()


def test_weights_sum_to_one_and_follow_the_query():
    torch.manual_seed(0)
    plug = PersonaPlug(d_enc=3, d_llm=8, target_norm=3.0)
    items = torch.stack([_unit([1, 0, 0]), _unit([0, 1, 0]), _unit([0, 0, 1])]).unsqueeze(0).repeat(3, 1, 1)
    mask = torch.ones(3, 3, dtype=torch.bool)
    queries = torch.stack([_unit([1, 0, 0]), _unit([0, 1, 0]), _unit([0, 0.2, 1])])
    w = plug.weights(queries, items, mask)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert w.argmax(-1).tolist() == [0, 1, 2]  # each query attends most to the item it points at
    mask[:, 2] = False  # padding gets no weight
    w = plug.weights(queries, items, mask)
    assert torch.all(w[:, 2] == 0) and torch.allclose(w.sum(-1), torch.ones(3))
    soft = plug(queries, items, mask)
    assert soft.shape == (3, 2, 8)
    assert torch.allclose(soft.norm(dim=-1), torch.full((3, 2), 3.0), atol=1e-4)  # at the LLM's embedding scale
    assert torch.allclose(soft[0, 0], soft[1, 0])  # the instruction token does not depend on the user


def test_a_user_with_one_item_gets_that_items_projection():
    plug = PersonaPlug(d_enc=3, d_llm=4, target_norm=1.0)
    h = _unit([0.3, 0.4, 0.5]).view(1, 1, 3)
    q = _unit([1, 0, 0]).view(1, 3)
    w = plug.weights(q, h, torch.ones(1, 1, dtype=torch.bool))
    assert w.item() == pytest.approx(1.0)
    expected = plug.proj(h[0, 0])
    got = plug(q, h, torch.ones(1, 1, dtype=torch.bool))[0, 1]
    assert torch.allclose(got, expected / expected.norm(), atol=1e-5)


@pytest.mark.parametrize("split", [True, False], ids=["split-prefill", "one-call"])
def test_soft_tokens_land_before_the_prompt_tokens(engine, split):
    """Capture what the model is fed first: pads, then the two soft tokens, then the prompt's own embeddings (all
    but the last token where the prefill is split from the decoding, which feeds that token)."""
    prompts = [
        [{"role": "user", "content": "Name a color."}],
        [{"role": "user", "content": "Write a title for a paper about graph neural networks."}],
    ]
    d = engine.model.get_input_embeddings().weight.shape[1]
    soft = [np.full((2, d), 0.5, dtype=np.float32), None]
    seen = {}

    def capture(module, args, kwargs):
        if "inputs_embeds" in kwargs and kwargs["inputs_embeds"] is not None and "first" not in seen:
            seen["first"] = kwargs["inputs_embeds"].detach().clone()
            seen["mask"] = kwargs["attention_mask"].detach().clone()

    handle = engine.model.model.register_forward_pre_hook(capture, with_kwargs=True)
    was, engine.split_prefill = engine.split_prefill, split
    try:
        outs = engine.generate([Request(p, s) for p, s in zip(prompts, soft)], SamplingParams(max_new_tokens=4))
    finally:
        handle.remove()
        engine.split_prefill = was
    ids = [engine.formatter.encode(engine.render(p)) for p in prompts]
    fed = [seq[:-1] if split else seq for seq in ids]
    table = engine.model.get_input_embeddings().weight
    embeds, mask = seen["first"], seen["mask"]
    order = sorted(range(2), key=lambda i: len(ids[i]) + (2 if soft[i] is not None else 0))
    width = embeds.shape[1]
    for row, i in enumerate(order):
        n = len(fed[i]) + (2 if soft[i] is not None else 0)
        start = width - n
        assert mask[row, :start].sum() == 0 and mask[row, start:].all()
        if soft[i] is not None:
            assert torch.allclose(embeds[row, start : start + 2], torch.full((2, d), 0.5))
            start += 2
        assert torch.allclose(embeds[row, start:], table[torch.tensor(fed[i])])
    assert outs[0].prompt_tokens == len(ids[0]) + 2 and outs[1].prompt_tokens == len(ids[1])


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    plug = PersonaPlug(d_enc=6, d_llm=10, target_norm=2.5)
    store = RunStore(str(tmp_path), StorageConfig())
    save_checkpoint(store, plug, {"encoder": "e", "model": "m", "task": "LaMP_5", "max_items": 4})
    loaded, meta = load_checkpoint(str(tmp_path), StorageConfig())
    q, h, m = torch.randn(2, 6), torch.randn(2, 3, 6), torch.ones(2, 3, dtype=torch.bool)
    assert torch.allclose(plug(q, h, m), loaded(q, h, m))
    assert meta["model"] == "m" and meta["d_llm"] == 10


def tiny_training_job(out, *extra: str):
    return load_job(
        REPO / "jobs" / "train_pplug.yaml",
        [
            f"output={out}",
            f"pplug.train_questions={SAMPLE}_questions.json",
            f"pplug.train_outputs={SAMPLE}_outputs.json",
            "pplug.val_users=2",
            "pplug.batch_size=4",
            "pplug.eval_every=1",
            "pplug.max_input_tokens=64",
            "pplug.epochs=0.5",
            "pplug.encoder_max_tokens=64",
            "pplug.max_train_users=16",
            "pplug.max_items=8",
            *extra,
        ],
    )  # 8 history items of 64 encoder tokens a user: encoding was half the time


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A plug trained for a few steps on the committed sample (enough to serve; not to be good)."""
    out = tmp_path_factory.mktemp("pplug")
    summary = train(tiny_training_job(out), log=lambda m: None)
    return out, summary


class Interrupted(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_weights(tiny_checkpoint, tmp_path):
    """Killed after the step-1 snapshot of 2, a rerun continues at step 2 and ends with the weights, loss history
    and validation curve of the uninterrupted run; a finished run is not retrained, and a rerun with other
    settings is refused rather than mixed in."""
    whole, ref = tiny_checkpoint
    cut = tmp_path / "cut"
    assert ref["steps"] == 2 and ref["resumed_from_step"] == 0

    def stop_at_step_1(message: str) -> None:
        if message.startswith("step 1/2"):
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_training_job(cut), log=stop_at_step_1)
    assert (cut / "checkpoint" / "resume.pt").is_file() and not (cut / "training.json").exists()
    messages: list[str] = []
    resumed = train(tiny_training_job(cut), log=messages.append)
    assert any(m.startswith("resuming from the snapshot at step 1/2") for m in messages)
    assert not any(m.startswith("step 1/2") for m in messages)  # step 1 was not redone
    assert resumed["resumed_from_step"] == 1 and not (cut / "checkpoint" / "resume.pt").exists()
    assert (
        json.loads((cut / "training.json").read_text())["history"]
        == json.loads((whole / "training.json").read_text())["history"]
    )
    a, _ = load_checkpoint(str(whole), StorageConfig())
    b, _ = load_checkpoint(str(cut), StorageConfig())
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name

    messages.clear()
    assert train(tiny_training_job(cut), log=messages.append) == resumed
    assert messages and "already trained" in messages[0]
    with pytest.raises(StepbackError, match="trained with other settings"):
        train(tiny_training_job(cut, "pplug.lr=0.01"), log=lambda m: None)


def test_training_writes_checkpoint_curve_and_plot(tiny_checkpoint):
    out, summary = tiny_checkpoint
    assert summary["train_users"] == 16 and summary["val_users"] == 2
    history = json.loads((out / "training.json").read_text())["history"]
    assert len(history["val_loss"]) >= 2 and all(np.isfinite(history["train_loss"]))
    assert (out / "loss.png").stat().st_size > 5000 and (out / "checkpoint" / "pplug.pt").is_file()


def test_pplug_modes_in_the_pipeline_with_an_empty_history(tiny_checkpoint, tmp_path):
    from stepback_ray.pipeline import run_job

    ckpt, _ = tiny_checkpoint
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            f"input.questions={FIXTURES / 'LaMP_5_questions.json'}",
            f"input.outputs={FIXTURES / 'LaMP_5_outputs.json'}",
            f"output={tmp_path / 'run'}",
            "modes=[none, pplug, pplug+profile]",
            f"pplug.checkpoint={ckpt}",
            "generation.max_new_tokens=12",
            "profile.max_new_tokens=32",
            "executor=in-process",
        ],
    )
    result = run_job(job)
    gens = pd.read_parquet(tmp_path / "run" / "generations")
    assert len(gens) == 9 and set(gens["status"]) == {"ok"}
    plugged = gens[gens["mode"] == "pplug"].set_index("user_id")
    none = gens[gens["mode"] == "none"].set_index("user_id")
    # a user with history: two soft tokens more than the same prompt without them
    assert plugged.loc["q:310", "prompt_tokens"] == none.loc["q:310", "prompt_tokens"] + 2
    assert plugged.loc["q:310", "prompt"] == none.loc["q:310", "prompt"]
    # the user with no history falls back to none and says so
    assert plugged.loc["q:312", "prompt_tokens"] == none.loc["q:312", "prompt_tokens"]
    assert any("pplug: no history" in n for n in plugged.loc["q:312", "notes"])
    emb = pd.read_parquet(tmp_path / "run" / "embeddings")
    assert sorted(emb["user_id"]) == ["q:310", "q:311", "q:312"]
    assert len(emb.set_index("user_id").loc["q:310", "vectors"]) == 3
    assert result.metrics["modes"]["pplug+profile"]["scored"] == 3


def test_pplug_random_serves_the_donors_soft_token_with_the_users_own_input(tiny_checkpoint, tmp_path):
    """The control for Persona-Plug: the query's own input with another user's items behind the soft token. Called
    on the generation plan stage directly (no engine): its soft tokens are the plug's output for (this input, the
    donor's item vectors), never this user's own."""
    import pyarrow as pa

    from stepback_ray import pipeline as pl
    from stepback_ray.data import donors
    from stepback_ray.pipeline.embed_pass import EmbedStage, commit_embeddings
    from stepback_ray.pipeline.generation_pass import GenerationPlanStage

    ckpt, _ = tiny_checkpoint
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            f"input.questions={SAMPLE}_questions.json",
            f"input.outputs={SAMPLE}_outputs.json",
            "limit=4",
            f"output={tmp_path / 'run'}",
            "modes=[pplug, pplug-random]",
            f"pplug.checkpoint={ckpt}",
            "ray.num_shards=1",
            "ray.progress_bars=false",
        ],
    )
    work = pl.prepare_work(job, None)
    at = pl.ProfilesAt(job.output_uri, "profiles")
    commit_embeddings(EmbedStage(job, at)(pa.Table.from_pylist(work.profile_chunks)), job, at)
    stage = GenerationPlanStage(job, at)
    rows = stage(pa.Table.from_pylist(work.generation_chunks)).to_pylist()
    soft = {(r["user_id"], r["mode"]): np.asarray(r["soft_tokens"]) for r in rows}
    inputs = {r["user_id"]: r["input"] for r in rows}
    vectors = stage._embeddings([c["chunk_id"] for c in work.generation_chunks])
    pairs = donors(sorted(inputs), job.generation.seed)
    assert len(pairs) == 4 and all(u != d for u, d in pairs.items())
    from stepback_ray.data.rows import most_recent_first

    history = {u["user_id"]: u["history"] for u in lamp5_users(4)}
    assert stage.plug.max_items == 8 and max(len(vectors[d]) for d in pairs.values()) > 8  # a history is cut
    for user, donor in pairs.items():  # the donor's newest max_items items
        newest = [vectors[donor][it["id"]] for it in most_recent_first(history[donor])][: stage.plug.max_items]
        expected = stage.plug.soft_tokens([(inputs[user], newest)])[0]
        np.testing.assert_allclose(soft[(user, "pplug-random")], expected, rtol=1e-5, atol=1e-6)
        assert not np.allclose(soft[(user, "pplug-random")], soft[(user, "pplug")])
