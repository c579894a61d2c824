"""``bnfx.lightning``: the LayerSync plugin and the callbacks in real Lightning Trainers, against
one process on the concatenated batch (sync), the chunk loop (ghost) and the population
statistics computed in the test (PreciseBN)."""

import copy
import importlib
import os
import subprocess
import sys

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
import bnfx.lightning  # noqa: E402
import lightning_models  # noqa: E402
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state  # noqa: E402
from lightning_models import BATCH, CompiledRegression, Data, Regression, SaveState, reference_training  # noqa: E402

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _trainer(package, tmp_path, **kwargs):
    L = importlib.import_module(package)
    return L.Trainer(accelerator="cpu", precision="64-true", default_root_dir=str(tmp_path), **QUIET, **kwargs)


def _rank_states(tmp_path, world_size=2, graphs=0):
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    assert [state.pop("graphs") for state in states] == [graphs] * world_size
    return states


def _assert_state_equal(state, reference: dict, **tolerance):
    assert list(state) == list(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, msg=key, **tolerance)


def test_sync_plugin_fits_equal_to_one_process_and_resumes(tmp_path):
    """2 gloo ranks (ddp_spawn), 2 epochs with the plugin, checkpoints written by Lightning;
    then a run resumed from the first epoch's checkpoint."""
    reference = reference_training(lightning_models.network(), epochs=2, world_size=2)
    expected = {f"net.{k}": v for k, v in reference.state_dict().items()}
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, filename="{epoch}")
    trainer = _trainer(
        "pytorch_lightning", tmp_path, devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0,
        plugins=[bnfx.lightning.SyncBatchNorm()], callbacks=[checkpoints, SaveState(str(tmp_path))],
    )
    trainer.fit(Regression(), Data())
    for state in _rank_states(tmp_path):  # identical on both ranks, equal to one process
        _assert_state_equal(state, expected)
    for name in os.listdir(tmp_path):
        if name.startswith("rank"):
            os.remove(tmp_path / name)

    resumed = _trainer(
        "pytorch_lightning", tmp_path, devices=2, strategy="ddp_spawn", max_epochs=2, limit_val_batches=0,
        plugins=[bnfx.lightning.SyncBatchNorm()], callbacks=[SaveState(str(tmp_path))], enable_checkpointing=False,
    )
    resumed.fit(Regression(), Data(), ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    for state in _rank_states(tmp_path):
        _assert_state_equal(state, expected)


def test_sync_plugin_with_the_network_compiled(tmp_path):
    reference = reference_training(lightning_models.network(), epochs=1, world_size=2)
    trainer = _trainer(
        "pytorch_lightning", tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, limit_val_batches=0,
        plugins=[bnfx.lightning.SyncBatchNorm()], callbacks=[SaveState(str(tmp_path))], enable_checkpointing=False,
    )
    trainer.fit(CompiledRegression(), Data())
    for state in _rank_states(tmp_path, graphs=1):  # one graph, no break per layer
        _assert_state_equal(state, {f"net.{k}": v for k, v in reference.state_dict().items()})


def test_precise_bn_leaves_the_population_statistics_on_every_rank(tmp_path):
    """Plain batch norm on each rank, then PreciseBN before validation: the running statistics
    of the first batch norm are those of its input over the whole training set."""
    trainer = _trainer(
        "pytorch_lightning", tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, limit_val_batches=1,
        callbacks=[bnfx.lightning.PreciseBN(num_batches=100), SaveState(str(tmp_path))],
        enable_checkpointing=False,
    )
    trainer.fit(Regression(), Data())
    states = _rank_states(tmp_path)
    _assert_state_equal(states[1], states[0], rtol=0, atol=0)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    conv.load_state_dict({"weight": states[0]["net.0.weight"], "bias": states[0]["net.0.bias"]})
    with torch.no_grad():
        features = conv(lightning_models.dataset().tensors[0]).transpose(0, 1).flatten(1)  # [C, N*H*W]
    torch.testing.assert_close(states[0]["net.1.running_mean"], features.mean(1))
    torch.testing.assert_close(states[0]["net.1.running_var"], features.var(1))


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_ghost_callback_on_one_device_equals_the_chunk_loop(package, tmp_path):
    pytest.importorskip(package)
    module_class, data_class = lightning_models.classes(package)
    module = module_class()
    reference = chunk_loop_model(copy.deepcopy(module.net), 2)
    trainer = _trainer(package, tmp_path, devices=1, max_epochs=1, limit_val_batches=0, enable_checkpointing=False,
                       callbacks=[bnfx.lightning.GhostBatchNorm(ghost_batch_size=2)])
    trainer.fit(module, data_class())
    reference_training(reference, epochs=1, world_size=1)
    _assert_state_equal(module.net.state_dict(), unwrapped_state(reference))
    assert not any("forward" in vars(m) for m in module.modules())  # reverted after the run
    assert BATCH % 2  # batches of 3 in chunks of 2: uneven ghost batches


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int, got 0"):
        bnfx.lightning.GhostBatchNorm(ghost_batch_size=0)
    with pytest.raises(ValueError, match="bnfx.lightning.SyncBatchNorm takes sync options"):
        bnfx.lightning.SyncBatchNorm(sync=False)
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int, got 0"):
        bnfx.lightning.PreciseBN(every_n_epochs=0)


def test_without_lightning_the_import_error_names_the_extra():
    script = (
        "import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
        "import bnfx.lightning"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ImportError: bnfx.lightning needs Lightning" in result.stderr
    assert "pip install 'bnfx[lightning]'" in result.stderr
