"""A tiny text-to-image digits run: captions in the batch, loss falls, a grid row per class
prompt, ``mlgen sample --prompt``, ``mlgen eval`` scoring prompted digits, bad inputs."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

import mlgen
from mlgen.cli.sample import eval_main, sample_main
from mlgen.config import Config, ConfigError, InputError, MeshConfig, OptimConfig, TrainConfig
from mlgen.data.captions import EVAL_TEMPLATES, TRAIN_TEMPLATES, caption
from mlgen.data.images import ImageDataConfig, make_image_data
from mlgen.data.tokenizer import ByteTokenizer
from mlgen.models.encoder import EncoderConfig
from mlgen.models.text import TextConfig
from mlgen.models.unet import PRESETS
from mlgen.objectives.diffusion import DiffusionObjectiveConfig, SamplerConfig
from mlgen.runs import setup
from mlgen.tasks import text as text_lib
from mlgen.train.checkpoint import Checkpointer

TEXT = TextConfig(
    encoder=EncoderConfig(vocab_size=256, num_layers=1, d_model=16, num_heads=2), max_len=24
)


def tiny_text_config(workdir: str) -> Config:
    return Config(
        task="diffusion",
        workdir=workdir,
        seed=0,
        model=dataclasses.replace(PRESETS["unet-tiny"], context_dim=16, text=TEXT),
        data=ImageDataConfig(source="digits", image_size=8, batch_size=16),
        objective=DiffusionObjectiveConfig(
            prediction="v",
            loss_weighting="min_snr",
            sampling=SamplerConfig(sampler="ddim", steps=3, per_class=2, max_steps=4),
        ),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        train=TrainConfig(
            num_steps=30,
            log_every=10,
            eval_every=30,
            eval_steps=1,
            checkpoint_every=30,
            progress_bar=False,
            async_checkpoints=False,
            ema_decay=0.9,
        ),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("digits-text")
    return workdir, mlgen.train(tiny_text_config(str(workdir)))


def test_captioned_batches():
    """Each example's caption names its class, drawn from the train templates (the held-out
    ones for validation), differently across examples of a class."""
    tok = ByteTokenizer()
    m = tiny_text_config("/unused").model
    data = ImageDataConfig(source="digits", image_size=8, batch_size=64)
    for split, templates in (("train", TRAIN_TEMPLATES), ("validation", EVAL_TEMPLATES)):
        it = make_image_data(data, split=split, seed=0, example_map=text_lib.caption_map(m, split))
        batch = next(it)
        assert batch["text_tokens"].shape == (64, 24) and batch["text_mask"].dtype == np.int32
        texts = [
            tok.decode(t[: int(k.sum())]) for t, k in zip(batch["text_tokens"], batch["text_mask"])
        ]
        for label, text in zip(batch["labels"], texts):
            assert text in {caption(t, int(label)) for t in templates}, (label, text)
        assert len(set(texts)) > 10


def test_text_run_loss_falls_and_grid_has_a_row_per_class(run):
    workdir, result = run
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < 0.85 * lines[0]["loss"], lines
    assert "eval_loss" in lines[-1]
    grid = Image.open(workdir / "samples" / "step_000030.png")
    w, h = grid.size
    assert h > 4 * w  # 10 prompt rows of 2 samples
    # The text encoder trained jointly (its parameters moved from their init).
    assert "encoder" in result.state["params"]["text"]


def test_sample_cli_prompts(run, tmp_path):
    workdir, _ = run
    out = tmp_path / "x.png"
    args = [str(workdir), "--prompt", "a handwritten seven", "--prompt", ""]  # "" = no text
    assert sample_main(args + ["--num", "3", "--steps", "2", "--out", str(out)]) == 0
    w, h = Image.open(out).size
    assert w > h  # 2 rows of 3
    with pytest.raises(InputError, match=r"^--prompt: .*max_len=24"):
        sample_main([str(workdir), "--prompt", "x" * 30, "--out", str(out)])
    with pytest.raises(InputError, match=r"^--class: .*--prompt"):
        sample_main([str(workdir), "--class", "3", "--out", str(out)])


def test_eval_scores_prompted_digits(run):
    workdir, _ = run
    assert eval_main([str(workdir), "--num", "20", "--batch", "10", "--steps", "2"]) == 0
    scores = json.loads((workdir / "eval.json").read_text())
    assert 0.0 <= scores["accuracy"] <= 1.0 and scores["num_samples"] == 20
    assert "held-out" in scores["prompts"] and "frechet" in scores
    labels, prompts = text_lib.eval_prompts(20)
    assert labels.tolist() == [i % 10 for i in range(20)]
    assert prompts[7] == caption(EVAL_TEMPLATES[0], 7) and prompts[17] == caption(
        EVAL_TEMPLATES[1], 7
    )


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.source=folder", "data.source"),
        ("model.text.encoder.vocab_size=100", "model.text.encoder.vocab_size"),
        ("model.text.init=/nonexistent", "model.text.init"),
        ("model.context_dim=-2", "model.context_dim"),
    ],
)
def test_bad_text_run_fields(override, field, tmp_path):
    cfg = tiny_text_config(str(tmp_path))
    if override.startswith("data.source"):  # a real folder, so only the text check fires
        (tmp_path / "pngs").mkdir()
        override += f" data.path={tmp_path / 'pngs'}"
    with pytest.raises(ConfigError) as e:
        mlgen.config.load(cfg, override.split()).validate(1)
    msg = str(e.value)
    assert msg.startswith(field + ":") and "\n" not in msg, msg


def test_text_init_loads_an_encoder_run_and_freezes_it(tmp_path):
    """``model.text.init``: a new run's text encoder starts from an encoder run's latest
    parameters (the trainable predicate then leaves it out); a mismatched encoder config is a
    one-line error naming the field."""
    enc = EncoderConfig(vocab_size=264, num_layers=1, d_model=16, num_heads=2)
    mlm = mlgen.config.load("configs/encoder/tiny_mlm.py", [f"workdir={tmp_path / 'mlm'}"])
    mlm = dataclasses.replace(mlm, model=enc)
    s = setup(mlm.validate(1), devices=jax.devices()[:1])
    saved = jax.tree.map(np.asarray, s.state["params"])
    ckpt = Checkpointer(mlm.workdir, async_save=False)
    ckpt.save(1, s.state, config=mlm, force=True)
    ckpt.close()

    cfg = tiny_text_config(str(tmp_path / "t2i"))
    text = dataclasses.replace(TEXT, encoder=enc, init=mlm.workdir, freeze=True)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=text))
    t = setup(cfg.validate(1), devices=jax.devices()[:1])
    ours = t.state["params"]["text"]["encoder"]
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(saved)
    ):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))
    assert t.task.trainable is not None and not t.task.trainable("text/encoder/embedding/x")

    wrong = dataclasses.replace(text, encoder=dataclasses.replace(enc, mlp_dim=64))
    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text=wrong))
    with pytest.raises(ConfigError, match=r"^model\.text\.encoder\.mlp_dim: text\.init "):
        bad.validate(1)
