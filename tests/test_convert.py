"""HF ⇄ Orbax conversion: bit-exact round trips, exports transformers loads, interrupted saves, errors, CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from conftest import write_tiny_hf_checkpoint
from convert.__main__ import main as cli_main
from gtpo_jax.checkpoint import Checkpointer, load_model
from gtpo_jax.conversion import hf_to_orbax, orbax_to_hf
from gtpo_jax.hf_io import SAFETENSORS_INDEX, SINGLE_SAFETENSORS, is_weight_file, read_hf_config, write_hf_dir
from gtpo_jax.model import CheckpointMismatchError, ModelConfig, ModelConfigError
from gtpo_jax.model.params import iter_nested

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a real SDAR directory carries besides weights; every byte must survive a round trip.
ASSETS = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n',
    "tokenizer_config.json": '{"added_tokens_decoder": {"151669": {"content": "<|MASK|>"}}}\n',
    "chat_template.jinja": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}\n",
    "configuration_sdar.py": "# custom config code, loaded through auto_map\n",
    "modeling_sdar.py": "# custom model code, loaded through auto_map\n",
}
CUSTOM_FIELDS = {
    "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
    "mask_token_id": 151669,
    "fuse_cross_entropy": True,
}


def make_source(path, *, tie: bool = True, dtype: str = "float32", shard: str | None = None):
    """A tiny SDAR-style HF directory with custom config fields and assets; returns the fp32 torch model.

    shard: re-save the weights with transformers' own `save_pretrained(max_shard_size=shard)`, so the
    reader is tested on the index transformers writes, not only on ours.
    """
    path = str(path)
    model = write_tiny_hf_checkpoint(path, tie=tie, dtype=dtype)
    config = read_hf_config(path)
    if shard is not None:
        import torch

        for name in os.listdir(path):
            if is_weight_file(name):
                os.remove(os.path.join(path, name))
        model.to(getattr(torch, dtype)).save_pretrained(path, max_shard_size=shard)
        model.float()
        assert os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)), "source did not shard; lower max_shard_size"
    config.update(CUSTOM_FIELDS)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name, text in ASSETS.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return model


def hf_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or index), read with safetensors' own loader."""
    path = str(path)
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [SINGLE_SAFETENSORS]
    out: dict[str, np.ndarray] = {}
    for fname in files:
        tensors = load_file(os.path.join(path, fname))
        assert not set(tensors) & set(out), f"{fname} repeats tensors"
        out.update(tensors)
    return out


def assert_same_hf_dir(src, dst) -> None:
    """Same tensor names, shapes, dtypes and bytes; same config.json; every non-weight file copied verbatim."""
    a, b = hf_tensors(src), hf_tensors(dst)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"
    assert read_hf_config(src) == read_hf_config(dst)
    for name in os.listdir(src):
        if not is_weight_file(name) and name != "config.json":
            with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "rb") as g:
                assert f.read() == g.read(), f"{name} not copied verbatim"


def param_tree(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def flat_params(model) -> dict:
    return {tuple(map(str, path)): np.asarray(x) for path, x in iter_nested(param_tree(model))}


# ---- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("tie,dtype", [(True, "float32"), (False, "float32"), (False, "bfloat16")])
def test_round_trip_is_bit_exact(tmp_path, tie, dtype):
    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    make_source(src, tie=tie, dtype=dtype)
    summary = hf_to_orbax(src, ckpt)
    assert summary.step == 0 and summary.dtype == dtype
    assert summary.num_tensors == len(hf_tensors(src))
    assert sorted(os.listdir(ckpt / "hf_assets")) == sorted(["config.json", "generation_config.json", *ASSETS])
    with Checkpointer(ckpt, read_only=True) as c:
        stored = c.restore()["params"]
    assert {x.dtype.name for _, x in iter_nested(stored)} == {dtype}  # no silent up-cast on the way in
    back = orbax_to_hf(ckpt, out)
    assert (back.num_tensors, back.num_bytes, back.dtype) == (summary.num_tensors, summary.num_bytes, dtype)
    assert os.listdir(out).count(SINGLE_SAFETENSORS) == 1 and SAFETENSORS_INDEX not in os.listdir(out)
    assert_same_hf_dir(src, out)
    cfg = read_hf_config(out)
    assert cfg["model_type"] == "sdar" and cfg["architectures"] == ["SDARForCausalLM"] and cfg["block_size"] == 4
    assert cfg["torch_dtype"] == dtype and cfg["tie_word_embeddings"] is tie
    assert ("lm_head.weight" in hf_tensors(out)) is (not tie)


def test_sharded_source_and_sharded_export(tmp_path):
    src, ckpt, out, single = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out", tmp_path / "single"
    make_source(src, tie=False, shard="40KB")
    hf_to_orbax(src, ckpt)
    summary = orbax_to_hf(ckpt, out, max_shard_bytes="30KB")
    files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert len(files) > 2 and SINGLE_SAFETENSORS not in files
    assert files == [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    with open(out / SAFETENSORS_INDEX) as f:
        index = json.load(f)
    tensors = hf_tensors(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == summary.num_bytes == sum(t.nbytes for t in tensors.values())
    for fname in files:  # every tensor lives in the shard the index names
        assert set(load_file(out / fname)) == {n for n, f in index["weight_map"].items() if f == fname}
    assert_same_hf_dir(src, out)
    # a re-export into the same directory as one file leaves no stale shard behind
    orbax_to_hf(ckpt, out)
    assert sorted(n for n in os.listdir(out) if is_weight_file(n)) == [SINGLE_SAFETENSORS]
    orbax_to_hf(ckpt, single)
    assert_same_hf_dir(src, single)


def test_bf16_export_loads_in_transformers(tmp_path):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    src, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "out"
    ref = make_source(src, tie=False)
    hf_to_orbax(src, ckpt)
    summary = orbax_to_hf(ckpt, out, dtype="bfloat16", max_shard_bytes="60KB")
    assert summary.dtype == "bfloat16" and read_hf_config(out)["torch_dtype"] == "bfloat16"
    assert {t.dtype.name for t in hf_tensors(out).values()} == {"bfloat16"}
    # model_type "sdar" is not registered in transformers: load it as the Qwen3 it is.
    config = Qwen3Config.from_pretrained(out)
    loaded = Qwen3ForCausalLM.from_pretrained(out, config=config, dtype=torch.bfloat16).eval()
    theirs = loaded.state_dict()
    for name, p in ref.state_dict().items():  # exactly round-to-nearest bf16 of the fp32 weights
        assert torch.equal(theirs[name], p.to(torch.bfloat16)), name
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
    with torch.no_grad():
        want = ref(input_ids=tokens).logits.numpy()
        got = loaded.float()(input_ids=tokens).logits.numpy()
    err = np.abs(got - want).max()
    assert err < 0.02 * np.abs(want).max() + 1e-3, err


def test_load_model_from_hf_dir_orbax_root_and_step_dir(tmp_path):
    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    make_source(src, tie=False)
    hf_to_orbax(src, ckpt)
    models = [load_model(src), load_model(ckpt), load_model(ckpt / "0")]
    assert models[0].cfg == models[1].cfg == models[2].cfg
    want = flat_params(models[0])
    for model in models[1:]:
        got = flat_params(model)
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_array_equal(got[path], want[path], err_msg=".".join(path))
    assert load_model(ckpt, param_dtype="bfloat16").cfg.param_dtype == "bfloat16"


# ---- interrupted saves -------------------------------------------------------------------------
def _save_step(ckpt, step: int, params: dict) -> None:
    with Checkpointer(ckpt, async_save=False) as c:
        c.save(step, params=params, meta={"model_config": read_hf_config(ckpt / "hf_assets")}, force=True)


def test_interrupted_save_is_ignored(tmp_path, caplog):
    src, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    make_source(src)
    hf_to_orbax(src, ckpt)
    step0 = flat_params(load_model(ckpt))
    with Checkpointer(ckpt, read_only=True) as c:
        doubled = jax.tree.map(lambda x: x * 2, c.restore(0)["params"])
    _save_step(ckpt, 1, doubled)
    assert flat_params(load_model(ckpt))[("norm", "weight")].tolist() == (2 * step0[("norm", "weight")]).tolist()

    # cut step 1 short: orbax writes its commit markers last; also leave an orbax temporary directory
    for marker in ("_CHECKPOINT_METADATA", "commit_success.txt"):
        if os.path.exists(ckpt / "1" / marker):
            os.remove(ckpt / "1" / marker)
    os.makedirs(ckpt / "2.orbax-checkpoint-tmp-1234" / "params")
    caplog.set_level(logging.WARNING, logger="gtpo_jax.checkpoint")
    got = flat_params(load_model(ckpt))
    for path in step0:
        np.testing.assert_array_equal(got[path], step0[path])
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "interrupted save" in warned and "/1" in warned and "2.orbax-checkpoint-tmp-1234" in warned
    assert orbax_to_hf(ckpt, tmp_path / "out").step == 0
    assert os.path.isdir(ckpt / "1")  # read-only users change nothing on disk

    caplog.clear()
    with Checkpointer(ckpt, async_save=False) as c:  # a resuming trainer sets the broken step aside
        assert c.all_steps() == [0] and c.latest_step() == 0
    assert "interrupted save" in caplog.text
    assert not os.path.exists(ckpt / "1") and len(os.listdir(ckpt / "incomplete")) == 1
    _save_step(ckpt, 1, doubled)  # and step 1 can be saved again
    assert flat_params(load_model(ckpt / "1"))[("norm", "weight")].tolist() == (2 * step0[("norm", "weight")]).tolist()


# ---- errors --------------------------------------------------------------------------------------
def _edit_config(path, **changes) -> None:
    config = read_hf_config(path)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _edit_weights(path, fn) -> None:
    tensors = load_file(os.path.join(path, SINGLE_SAFETENSORS))
    fn(tensors)
    save_file(tensors, os.path.join(path, SINGLE_SAFETENSORS), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "hf"
    make_source(path, tie=False)
    return path


@pytest.fixture
def source(tmp_path, pristine):
    shutil.copytree(pristine, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (lambda p: _edit_config(p, model_type="llama"), ModelConfigError, "unsupported model_type 'llama'"),
        (lambda p: _edit_config(p, hidden_size=None), ModelConfigError, r"missing required field\(s\) \['hidden_size'\]"),
        (lambda p: _edit_config(p, hidden_size=48), CheckpointMismatchError, "has shape"),
        (lambda p: _edit_weights(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
         CheckpointMismatchError, r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"),
        (lambda p: _edit_weights(p, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)})),
         CheckpointMismatchError, r"'model\.norm\.weight' has shape \(63,\).*\(64,\)"),
        (lambda p: _edit_weights(p, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.ones(1, np.float32)})),
         CheckpointMismatchError, r"unexpected tensor 'model\.layers\.2\.mlp\.up_proj\.weight'"),
        (lambda p: os.remove(os.path.join(p, SINGLE_SAFETENSORS)), FileNotFoundError, "safetensors"),
    ],
    ids=["model_type", "missing_field", "config_shape", "missing_tensor", "wrong_shape", "extra_tensor", "no_weights"],
)
def test_bad_source_fails_clearly_and_writes_nothing(source, tmp_path, edit, error, match):
    edit(source)
    with pytest.raises(error, match=match):
        hf_to_orbax(source, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "0").exists()


def test_refuses_to_overwrite_or_export_into_sources(source, tmp_path):
    ckpt = tmp_path / "ckpt"
    hf_to_orbax(source, ckpt)
    with pytest.raises(FileExistsError, match="already holds an Orbax checkpoint"):
        hf_to_orbax(source, ckpt)
    with pytest.raises(FileExistsError, match="already holds files"):
        hf_to_orbax(source, source)
    with pytest.raises(ValueError, match="refusing to export into the checkpoint directory"):
        orbax_to_hf(ckpt, ckpt / "export")
    with pytest.raises(FileNotFoundError, match="not an Orbax checkpoint"):
        orbax_to_hf(source, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 7"):
        orbax_to_hf(ckpt, tmp_path / "out", step=7)
    cfg = ModelConfig.from_hf_dir(source)
    params = param_tree(load_model(source))
    with pytest.raises(ValueError, match="refusing to export into the source directory"):
        write_hf_dir(params, cfg, source, assets_dir=source)
    params["layers"][0]["mlp"].pop("gate_proj")
    with pytest.raises(CheckpointMismatchError, match=r"lack tensor\(s\).*model\.layers\.0\.mlp\.gate_proj"):
        write_hf_dir(params, cfg, tmp_path / "partial")


@pytest.mark.parametrize(
    "argv,match",
    [
        (["hf2orbax", "{tmp}/nowhere", "{tmp}/ckpt"], "does not exist"),
        (["hf2orbax", "{tmp}/not_hf", "{tmp}/ckpt"], "has no config.json"),
        (["hf2orbax", "{src}", "{tmp}/existing"], "already holds an Orbax checkpoint"),
        (["orbax2hf", "{tmp}/nowhere", "{tmp}/out"], "does not exist"),
        (["orbax2hf", "{tmp}/not_hf", "{tmp}/out"], "neither an HF model directory .* nor an Orbax checkpoint"),
        (["orbax2hf", "{tmp}/existing", "{tmp}/out", "--step", "3"], "no complete checkpoint for step 3"),
        (["orbax2hf", "{tmp}/existing", "{tmp}/out", "--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["orbax2hf", "{tmp}/existing", "{tmp}/existing/0/out"], "refusing to export into the checkpoint"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(source, tmp_path, capsys, argv, match):
    (tmp_path / "not_hf").mkdir()
    (tmp_path / "not_hf" / "notes.txt").write_text("hello")
    hf_to_orbax(source, tmp_path / "existing")
    capsys.readouterr()
    assert cli_main([a.format(tmp=tmp_path, src=source) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith("convert ")]
    assert len(lines) == 1 and re.search(match, lines[0]), err
    assert "Traceback" not in err


def test_cli_end_to_end(source, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def run(*args):
        proc = subprocess.run([sys.executable, "-m", "convert", *map(str, args)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    line = run("hf2orbax", source, tmp_path / "ckpt")
    assert re.fullmatch(r"25 tensors, [\d.]+ MB float32: .*hf -> .*ckpt \(step 0\) in [\d.]+ s", line), line
    line = run("orbax2hf", tmp_path / "ckpt", tmp_path / "out", "--max-shard-size", "50KB", "--step", "0")
    assert "(step 0)" in line
    assert os.path.isfile(tmp_path / "out" / SAFETENSORS_INDEX)
    assert_same_hf_dir(source, tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "convert", "orbax2hf", str(tmp_path / "nowhere"), str(tmp_path / "x")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "" and "does not exist" in proc.stderr.strip().splitlines()[-1]
