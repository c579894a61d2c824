"""torchvision ResNets under torch.compile(backend="bnfx", fullgraph=True): every site, same steps."""


import pytest
import torch
import torchvision
from torch._dynamo.backends.debugging import aot_eager

import bnfx  # noqa: F401  (registers torch.ops.bnfx)
from bnfx.chunk_loop import chunk_loop_model, unwrapped_state

GHOST_OP = torch.ops.bnfx.ghost_batch_norm.default


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,sites", [("resnet18", 20), ("resnet50", 53)])
def test_resnet_training_steps_match_eager_composer(name, sites, dtype):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).to(dtype)
    reference = chunk_loop_model(model, 16)
    rewritten = []

    def counting_inner(gm, example_inputs):
        rewritten.append(sum(n.target is GHOST_OP for n in gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(
        model, backend="bnfx", fullgraph=True, options={"ghost_batch_size": 16, "inner": counting_inner}
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        # Each step starts the reference from the model's state. Trajectories cannot be compared
        # over several steps: at random init, perturbing resnet50's batch-norm weights by 1e-7
        # relative moves the next outputs by tens of percent, with Composer against itself.
        reference.load_state_dict({k: v for k, v in zip(reference.state_dict(), model.state_dict().values())})
        x = torch.randn(40, 3, 32, 32, dtype=dtype)  # ghost batches of 14, 14, 12
        y = torch.randint(0, 10, (40,))
        outs = []
        for m in (compiled, reference):
            out = m(x)
            torch.nn.functional.cross_entropy(out, y).backward()
            outs.append(out.detach())
        assert relative_error(*outs) < 1e-4, step
        if dtype == torch.float64:
            # In fp32, backpropagation through a random-init ResNet amplifies the ~1e-7
            # summation-order differences of any two batch-norm kernels to percents.
            ref_grads = [p.grad for p in reference.parameters()]
            for (pname, param), ref_grad in zip(model.named_parameters(), ref_grads):
                assert relative_error(param.grad, ref_grad) < 1e-6, (step, pname)
        state, ref_state = model.state_dict(), unwrapped_state(reference)
        for key in state:
            assert relative_error(state[key].double(), ref_state[key].double()) < 1e-4, (step, key)
        optimizer.step()
        optimizer.zero_grad()
        reference.zero_grad()

    assert rewritten == [sites]  # one graph, every batch norm rewritten
    assert model.bn1.num_batches_tracked.item() == 3 * 3
