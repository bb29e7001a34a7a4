"""What a node refuses to become: a model that is no longer finite, or one its frames cannot carry."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from gossipfl.errors import ConfigError, ModelError
from gossipfl.learning.checkpoint import load_checkpoint, save_checkpoint
from gossipfl.learning.datasets import write_csv
from gossipfld.app import App


def test_a_diverging_slice_is_undone_with_a_lower_step_size_and_never_saved(make_apps, small_digits):
    (app,) = make_apps(1, training={"lr": 5.0})
    x, y = small_digits
    data = app.config.data.directory
    for old in data.iterdir():
        old.unlink()
    write_csv(data / "raw-units.csv", x * np.float32(1e30), y)  # sensor readings nobody scaled
    good = app.learner.model.params.copy()

    async def main():
        await trio.to_thread.run_sync(app.learner.data.refresh)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app.learner.run, lambda: True)
            with trio.fail_after(60):  # a few slices diverge; a node that never notices fails here
                while app.counters.values.get("divergences", 0) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert np.isfinite(app.learner.model.params).all()
        await app.checkpoint()

    trio.run(main)
    np.testing.assert_array_equal(app.learner.model.params, good)  # as before the slices that diverged
    assert app.learner.trainer.lr <= 5.0 / 4  # halved at each divergence
    model, state = load_checkpoint(app.persistence.checkpoint_path, app.learner.model.fingerprint)
    assert np.isfinite(model.params).all() and state["age"] == 0.0
    assert state["counters"]["divergences"] >= 2


def test_a_frame_limit_too_small_for_the_model_is_refused_at_start(make_apps):
    with pytest.raises(ConfigError, match=r"limits.max_frame_bytes: 2048 bytes cannot carry this model"):
        make_apps(1, extra={"limits": {"max_frame_bytes": 2048}})


def test_hostile_state_files_cost_a_warning_or_a_one_line_refusal_never_a_crash(make_apps, tmp_path):
    (app,) = make_apps(1)
    state_dir = app.config.node.state_dir
    trio.run(app.checkpoint)
    references = state_dir / "references.bin"
    references.unlink(missing_ok=True)
    references.symlink_to("/dev/zero")  # this crashed the start: read_bytes() never ended
    config, identity = app.config, app.identity
    restarted = App(config, identity)  # resumes the checkpoint, passes over the references with a warning
    assert len(restarted.references.incoming) == 0
    checkpoint = state_dir / "checkpoint.onnx"
    model, state = load_checkpoint(checkpoint, app.learner.model.fingerprint)
    save_checkpoint(checkpoint, model, {**state, "age": "abc"})  # a state that gave a traceback
    with pytest.raises(ModelError, match=r"cannot resume: .*'age' must be a number.*move .* away"):
        App(config, identity)
