"""A CUDA check of the quantizers' tensor path, for a machine with a GPU (not collected by pytest).

    python -m tests.cuda_check

Eager CUDA quantizers read their range to the host (``quant.HOST_READS_ON_CUDA``); with it off they
take the tensor path (no host reads), as under torch.compile. Both must compute the values of the
eager CPU path. Prints one line per check and exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

import torch

import fxcompress
from fxcompress import quant
from fxcompress.examples import SeedModel
from fxcompress.quant import ActivationQuantizer, WeightQuantizer
from fxcompress.settings import QuantSetting


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().contiguous().view(torch.int32).clone()


def quantizer_runs(device: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    out = []
    for scheme, dtype in [("per_tensor_affine", "uint"), ("per_tensor_symmetric", "int")]:
        q = ActivationQuantizer(QuantSetting(8, scheme, dtype), 1).train().to(device)
        for i in range(3):
            x = (torch.randn(8, 16, 32, 32) * (i + 1)).to(device).requires_grad_()
            y = q(x, torch.tensor(i, device=device))
            y.sum().backward()
            out += [bits(y), bits(x.grad), bits(q.tracked_min), bits(q.tracked_max)]
    for scheme, dtype in [("per_channel_symmetric", "int"), ("per_channel_affine", "uint")]:
        w = torch.nn.Parameter(torch.randn(64, 32, 3, 3).to(device))
        q = WeightQuantizer(QuantSetting(8, scheme, dtype), 0).train().to(device)
        y = q(w, torch.tensor(1, device=device))
        (y * y).sum().backward()
        out += [bits(y), bits(w.grad)]
    return out


def training_run(device: str, compiled: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                                            "quant_types": ["input", "weight", "output"], "quant_bits": 8,
                                            "quant_start_step": 1}]).to(device)
    for module in gm.modules():  # dropout draws differ between devices
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
    model = torch.compile(gm) if compiled else gm
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(4):
        x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(i)).to(device)
        loss = torch.nn.functional.nll_loss(model(x), (torch.arange(32) % 10).to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return [torch.tensor(losses)]


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    failures = 0
    cpu = quantizer_runs("cpu")
    for host_reads in (True, False):
        quant.HOST_READS_ON_CUDA = host_reads
        cuda = quantizer_runs("cuda")
        same = sum(torch.equal(a, b) for a, b in zip(cpu, cuda, strict=True))
        path = "host reads" if host_reads else "tensor path"
        print(f"quantizers, CPU fast path vs CUDA {path}: {same}/{len(cpu)} tensors bit-identical")
        for i, (a, b) in enumerate(zip(cpu, cuda, strict=True)):
            if not torch.equal(a, b):
                fa, fb = a.view(torch.float32), b.view(torch.float32)
                differ = float((fa - fb).abs().max())
                print(f"  tensor {i}: {int((a != b).sum())} of {a.numel()} differ, largest |difference| {differ:.3g}")
                # host reads must match exactly; the tensor path divides by Python scalars, which CUDA
                # does through their reciprocal: a scale may differ by an ulp (and a value by a level)
                failures += host_reads or not torch.allclose(fa, fb, rtol=1e-6, atol=1e-7)
    quant.HOST_READS_ON_CUDA = True
    eager_cpu, eager_cuda = training_run("cpu", False)[0], training_run("cuda", False)[0]
    close = torch.allclose(eager_cpu, eager_cuda, rtol=1e-3, atol=1e-4)
    print(f"4 QAT training steps, losses CPU {eager_cpu.tolist()} CUDA {eager_cuda.tolist()}: close={close}")
    failures += not close
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    compiled = training_run("cuda", True)[0]
    breaks = sum(counters["graph_break"].values())
    close = torch.allclose(compiled, eager_cuda, rtol=1e-3, atol=1e-4)
    print(f"torch.compile on CUDA: losses {compiled.tolist()}, close to eager={close}, graph breaks={breaks}")
    failures += (not close) + (breaks != 0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
