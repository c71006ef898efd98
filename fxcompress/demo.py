"""``python -m fxcompress demo``: the spec's model and configs, end to end on the digits data.

Training prints a line per epoch (step, mean loss, elapsed seconds), so a slow machine is never
silent. The QAT model is then deployed (finalize, convert to int8, export to ONNX and run in
onnxruntime) and compared with the float model; the demo ends with :data:`EXAMPLE`, a
train-then-evaluate script the user can copy.
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import tabulate
import torch
import torch.nn.functional as F

from fxcompress.api import compress, plan, select
from fxcompress.deploy import convert, export_onnx, finalize
from fxcompress.examples import SEED_CONFIGS, Digits, SeedModel, evaluate, load_digits
from fxcompress.report import calibration, summary
from fxcompress.training import get_step

__all__ = ["EXAMPLE", "run_demo"]

TUNE_LR = 0.01  # fine-tuning after compression at a fifth of the training rate
#: The QAT sub-config (the quant_start_step is added per run). ``quant_reduce_range``: activations on
#: 7-bit levels, so that convert's int8 kernels compute what the fake-quant model does on x86 CPUs
#: without VNNI (README, Deploy); the deploy step says so when it runs.
QAT_CONFIG = {"op_types": ["Conv2d", "Linear"], "quant_types": ["input", "weight"], "quant_bits": 8,
              "quant_reduce_range": True}
#: The batch the deploy step times (and the ONNX file's fixed batch size: export traces it).
DEPLOY_BATCH = 64

#: What to copy: compress, an ordinary training loop, evaluation in eval mode (a test runs it).
EXAMPLE = '''\
import torch, torch.nn.functional as F, fxcompress
from fxcompress.examples import SeedModel, load_digits

data = load_digits()  # scikit-learn's 8x8 digits as 1x28x28 tensors, split 70/30
gm = fxcompress.compress(SeedModel(), [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                                        "quant_types": ["input", "weight"], "quant_bits": 8, "quant_start_step": 20}])
opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
for epoch in range(3):  # your usual loop: the masks and the fake quantization are in gm's forward
    gm.train()
    for i in range(0, len(data.y_train), 64):
        opt.zero_grad()
        F.nll_loss(gm(data.x_train[i:i + 64]), data.y_train[i:i + 64]).backward()
        opt.step()
    gm.eval()
    with torch.no_grad():
        accuracy = (gm(data.x_test).argmax(1) == data.y_test).float().mean()
    print(f"epoch {epoch}: test accuracy {accuracy:.2%}")
print(fxcompress.summary(gm))
'''


def _show(title: str, text: str) -> None:
    # the demo is a command-line program: its output is the product, so it prints
    print(f"\n== {title} ==" + (f"\n{text}" if text else ""), flush=True)


def train_with_progress(model: torch.nn.Module, data: Digits, epochs: int, label: str, seed: int = 0,
                        lr: float = 0.05, batch_size: int = 64) -> None:
    """``examples.train_epochs`` (SGD with momentum 0.9, the same seeded order), printing after each
    epoch: ``[label] epoch e/E  step s  loss l  t s``."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    start, step = time.perf_counter(), 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(data.y_train), generator=gen)
        total = 0.0
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            opt.zero_grad()
            loss = F.nll_loss(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
            step += 1
        print(f"  [{label}] epoch {epoch}/{epochs}  step {step}  loss {total / len(order):.4f}  "
              f"{time.perf_counter() - start:.1f}s", flush=True)


def run_demo(quick: bool = False) -> None:
    """Plan tables for the spec's config lists, then pruning, QAT and both on the digits data."""
    torch.manual_seed(0)
    model = SeedModel()
    for title, config_list in SEED_CONFIGS.items():
        _show(f"spec example '{title}': {config_list}",
              f"selected layers: {select(model, config_list)}\n{summary(plan(model, config_list))}")
    data = load_digits()
    dense_epochs, tune_epochs = (2, 1) if quick else (15, 5)
    _show("training (one line per epoch: steps so far, mean loss, seconds)", "")
    train_with_progress(model, data, dense_epochs, "dense")
    dense = evaluate(model, data)
    longer = copy.deepcopy(model)
    train_with_progress(longer, data, tune_epochs, "float reference", seed=1, lr=TUNE_LR)
    reference = evaluate(longer, data)
    _show("dense baseline (scikit-learn digits, 28x28, stratified 70/30)",
          f"{dense_epochs} epochs: {dense:.2f}%   +{tune_epochs} epochs (the float reference): {reference:.2f}%")
    _pruning(model, data, tune_epochs, reference)
    qat = _qat(model, data, tune_epochs, reference)
    _pruning_and_qat(model, data, tune_epochs, reference)
    deploy(longer, qat, data, rounds=3 if quick else 10)
    _show("your turn: compress, train, evaluate (copy this into a file and run it)", EXAMPLE)


def _pruning(model: torch.nn.Module, data: Digits, epochs: int, reference: float) -> None:
    pruned = compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.8},
                              {"exclude": True, "op_names": ["fc2"]}])
    before = evaluate(pruned, data)
    train_with_progress(pruned, data, epochs, "80% pruned", seed=1, lr=TUNE_LR)
    _show("80% pruning (conv1, conv2, fc1)",
          f"accuracy right after masking: {before:.2f}%   after {epochs} epochs fine-tuning: "
          f"{evaluate(pruned, data):.2f}% (float reference {reference:.2f}%)\n{summary(pruned)}")


def _qat(model: torch.nn.Module, data: Digits, epochs: int, reference: float) -> torch.nn.Module:
    steps_per_epoch = -(-len(data.y_train) // 64)
    qat = compress(model, [{**QAT_CONFIG, "quant_start_step": steps_per_epoch}])
    train_with_progress(qat, data, epochs, "8-bit QAT", seed=1, lr=TUNE_LR)
    _show(f"8-bit QAT (input+weight; activations on 7-bit levels: quant_reduce_range), quantization from step "
          f"{steps_per_epoch}",
          f"float reference {reference:.2f}%   fake-quant after {epochs} epochs of QAT: "
          f"{evaluate(qat, data):.2f}%   (step counter: {get_step(qat)})\n{summary(qat)}\n"
          f"calibration of fc2 (NNI's export fields): {_short(calibration(qat)['fc2'])}")
    return qat


def _pruning_and_qat(model: torch.nn.Module, data: Digits, epochs: int, reference: float) -> None:
    both = compress(model, [{"op_types": ["Conv2d", "Linear"], "sparsity_per_layer": 0.5,
                             "quant_types": ["input", "weight", "output"], "quant_bits": 8}])
    train_with_progress(both, data, epochs, "50% pruned + 8-bit QAT", seed=1, lr=TUNE_LR)
    _show("50% pruning + 8-bit QAT (input, weight, output) in one sub-config",
          f"float reference {reference:.2f}%   pruned + fake-quant after {epochs} epochs: "
          f"{evaluate(both, data):.2f}%\n{summary(both)}")


def _short(fields: dict) -> dict:
    return {k: ([round(x, 5) for x in v[:3]] + ["..."] if isinstance(v, list) and len(v) > 3 else v)
            for k, v in fields.items()}


def deploy(float_model: torch.nn.Module, gm: torch.nn.Module, data: Digits, rounds: int) -> None:
    """The deploy step on the trained QAT model ``gm``: ``finalize`` (fake-quant inference model), ``convert``
    (int8) and ``export_onnx`` run in onnxruntime, in a table beside ``float_model`` (the float reference)."""
    batch = data.x_test[:DEPLOY_BATCH]
    finalized = finalize(gm)
    int8 = convert(gm, (batch,))
    models: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "float (the float reference)": float_model.eval(), "fake-quant (finalize)": finalized,
        "int8 (convert)": int8}
    sizes = {label: _state_dict_bytes(m) for label, m in models.items()}
    notes = [_range_choice()]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "seed_qat.onnx")
        session, missing = _onnx_session(gm, path, batch)
        if session is None:
            notes.append(f"{missing} is not installed, so the onnxruntime row is skipped "
                         "(pip install 'fxcompress[onnx]')")
        else:
            models["onnxruntime (export_onnx)"] = lambda x: _run_onnx(session, x)
            sizes["onnxruntime (export_onnx)"] = os.path.getsize(path)
    with torch.no_grad():
        outputs = {label: run(data.x_test) for label, run in models.items()}
    fake = outputs["fake-quant (finalize)"]
    latency = _interleaved_ms(models, batch, rounds)
    rows, accuracy = [], {}
    first = next(iter(models))
    for label, out in outputs.items():
        accuracy[label] = 100.0 * float((out.argmax(dim=1) == data.y_test).float().mean())
        diff = "-" if label.startswith(("float", "fake")) else f"{float((out - fake).abs().max()):.3g}"
        rows.append([label, f"{accuracy[label]:.2f}%", f"{sizes[label]:,}", f"{sizes[first] / sizes[label]:.2f}x",
                     f"{latency[label]:.1f}", f"{latency[first] / latency[label]:.2f}x", diff])
    table = tabulate.tabulate(rows, headers=["model", "test accuracy", "size (bytes)", "smaller", "latency (ms)",
                                             "faster", "max abs diff vs fake-quant"], tablefmt="github",
                              disable_numparse=True, colalign=("left", *["right"] * 6))
    notes += [table,
              "size: bytes of torch.save(state_dict); onnxruntime's: the .onnx file (float weights, each with a "
              "QuantizeLinear/DequantizeLinear pair)",
              f"latency: median of {rounds} interleaved rounds, one batch of {len(batch)} test images, 1 thread",
              f"max abs diff: from the fake-quant model's log-probabilities on the {len(data.y_test)} test images "
              f"(which reach {float(fake.abs().max()):.3g})"]
    if session is not None:
        import onnxruntime

        ort = outputs["onnxruntime (export_onnx)"]
        notes.append(f"onnxruntime {onnxruntime.__version__} ran the ONNX file (default optimizations: QDQ fused "
                     f"into integer kernels): test accuracy {accuracy['onnxruntime (export_onnx)']:.2f}%, "
                     f"max abs diff vs the fake-quant model {float((ort - fake).abs().max()):.3g}")
    _show("deploy the 8-bit QAT model: finalize -> convert (int8) -> export_onnx (onnxruntime)", "\n".join(notes))


def _range_choice() -> str:
    """One line: the QAT config's activation range and why, for this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        flags = None
    chosen = "QAT config: 'quant_reduce_range': True (7-bit activations, uint8 levels 0..127), "
    if flags is None:
        return chosen + ("because x86 CPUs without VNNI saturate oneDNN's 16-bit pair sums of uint8 x int8 products "
                         "with 8-bit activations, and with 7 bits convert computes what the fake-quant model does on "
                         "any x86 CPU")
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return chosen + (f"although this CPU ({capability}) has VNNI, which does not saturate with 8-bit activations: "
                         "with 7 bits the int8 model matches the fake-quant model on x86 CPUs without it too")
    return chosen + (f"because this CPU ({capability}) has no VNNI: oneDNN's uint8 x int8 kernels sum pairs of "
                     "products in 16 bits, which 8-bit activations saturate; with 7 bits convert computes what the "
                     "fake-quant model does")


def _onnx_session(gm: torch.nn.Module, path: str, batch: torch.Tensor) -> tuple[object | None, str]:
    """``export_onnx`` to ``path`` and an onnxruntime session on it (one thread), or None and the missing package."""
    for package in ("onnx", "onnxruntime"):
        try:
            __import__(package)
        except ImportError:
            return None, package
    import onnxruntime

    export_onnx(gm, path, (batch,))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"]), ""


def _run_onnx(session: object, x: torch.Tensor) -> torch.Tensor:
    """The ONNX model on ``x``, in batches of the file's fixed size (the last one padded with zeros)."""
    name, size = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    outputs = []
    for first in range(0, len(x), size):
        chunk = x[first:first + size]
        padded = torch.cat([chunk, chunk.new_zeros(size - len(chunk), *chunk.shape[1:])])
        outputs.append(torch.from_numpy(session.run(None, {name: padded.numpy()})[0][:len(chunk)]))
    return torch.cat(outputs)


def _state_dict_bytes(module: torch.nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def _interleaved_ms(models: dict[str, Callable[[torch.Tensor], torch.Tensor]], batch: torch.Tensor,
                    rounds: int) -> dict[str, float]:
    """Median milliseconds of one forward of each model on ``batch`` at one thread, the models taking turns each
    round (after two warm-up rounds), so that a busy moment of a shared machine slows all of them alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times: dict[str, list[float]] = {label: [] for label in models}
        for round_ in range(rounds + 2):
            for label, run in models.items():
                started = time.perf_counter()
                run(batch)
                if round_ >= 2:
                    times[label].append(1000 * (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    return {label: statistics.median(t) for label, t in times.items()}
