"""Sliding-window prediction through a compiled model: one graph per window shape, eager results."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from maeformer_fast.device import CompiledModel
from maeformer_fast.inference.sliding_window import sliding_window_predict
from maeformer_fast.models.config import get_config
from maeformer_fast.models.nnformer import NNFormer

WINDOW = (32, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compiled_prediction_is_one_graph_for_volumes_of_any_size():
    """Two volumes giving 6 windows (batches of 4 and 2) and 4 windows (one batch of 4) run through
    one compiled graph with no recompile and predict what the eager model predicts. Mutation caught:
    the last batch not filled up (a second graph for 2 windows)."""
    torch.manual_seed(0)
    model = NNFormer(get_config("small", embed_dim=8, num_heads=(1, 1, 2, 2))).eval()
    compiled, classes = CompiledModel(model, backend="aot_eager"), model.config.num_classes
    counters.clear()
    torch._dynamo.reset()
    for size in ((56, 40, 32), (40, 36, 30)):
        image = torch.randn(1, *size)
        expected = sliding_window_predict(model, image, WINDOW, classes, batch_size=4)
        actual = sliding_window_predict(compiled, image, WINDOW, classes, batch_size=4)
        assert not compiled.failed
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_finetuning_validates_through_the_compiled_model(phantom_cache, tmp_path, monkeypatch):
    """With ``compile``, validation runs the compiled model (its eval graph: three graphs in all, with
    the training step's and the optimizer step's) and scores what the eager run scores. Mutation
    caught: validating with the plain model (two graphs)."""
    import functools

    from maeformer_fast.train import finetune as finetune_module
    from maeformer_fast.train.finetune import FinetuneConfig, finetune
    from maeformer_fast.train.loop import prepare_model

    # inductor builds C++ for minutes on 2 cores; aot_eager runs the same graphs through eager kernels
    monkeypatch.setattr(finetune_module, "prepare_model",
                        functools.partial(prepare_model, compile_backend="aot_eager"))  # fmt: skip
    narrow = {"embed_dim": 8, "num_heads": (1, 1, 2, 2)}
    common = dict(steps=2, val_every=2, batch_size=2, num_workers=0, progress=False, max_val_cases=2,
                  evaluate_test=False, model_overrides=narrow)  # fmt: skip
    eager = finetune(FinetuneConfig(data=str(phantom_cache), out=str(tmp_path / "eager"), **common))
    counters.clear()
    torch._dynamo.reset()
    compiled = finetune(
        FinetuneConfig(data=str(phantom_cache), out=str(tmp_path / "compiled"), compile=True, **common)
    )
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert [step for step, _ in compiled.curve] == [step for step, _ in eager.curve] == [2]
    assert eager.curve[0][1] > 0.01  # foreground predicted (measured Dice 0.049): a labelling to compare
    assert compiled.curve[0][1] == pytest.approx(eager.curve[0][1], abs=1e-6)
