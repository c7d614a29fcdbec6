"""airbench's own training in PyTorch on the pipeline's split of a dataset: what the source method
scores on our data, beside the Keras baseline (`python -m pipeline baselines`) on the same rows.

    python bench/airbench_reference.py --dataset ../shared/data/cifar10-sample --epochs 10 \
        [--widths 64,128,128] [--threads 1] --extra-path /tmp/torchsite

Written from airbench's paper and published recipe (Jordan 2024, arXiv 2404.00498; airbench94):
a frozen 2x2 patch-whitening conv fitted to 5,000 training images (its bias trained for 3
epochs), three conv -> max-pool -> batch norm -> GELU blocks (batch norm: scale frozen,
momentum 0.6, epsilon 1e-12, offsets at 64x the rate), dirac-initialised convs, a max-pool head
into a bias-free linear layer scaled by 1/9; inputs normalised per channel; alternating flips and
2-pixel translations with reflected borders; label smoothing 0.2 on a summed loss; Nesterov SGD
(momentum 0.85, rate 11.5 and decay 0.0153 "per 1,024 examples") on a 0.2 -> 1 -> 0.07
triangle with a 23% warm-up; lookahead every 5 steps; six-view test-time augmentation on the
logits. Trains on the whole train split, scores the test split once. PyTorch is not one of the
project's dependencies: `--extra-path DIR` puts e.g. a `pip install --target DIR torch` on the
path. Prints per epoch seconds and loss, then `name=value` pairs: `test_accuracy_tta0`,
`test_accuracy_tta1`, `test_accuracy` (six views), `epoch_s`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="../shared/data/cifar10-sample")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--widths", default="64,128,128")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-path", default="", help="a folder with torch in it, put on sys.path")
    args = ap.parse_args(argv)
    if args.extra_path:
        sys.path.append(args.extra_path)
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F

    from pipeline.data import load_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset(args.dataset)
    x_test, y_test = data.test.open()
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def tensor(x):
        return (torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255 - mean) / std

    train_x, train_y = tensor(data.x_train), torch.from_numpy(data.y_train.astype(np.int64))
    test_x, test_y = tensor(x_test), torch.from_numpy(y_test.astype(np.int64))

    class BatchNorm(nn.BatchNorm2d):
        def __init__(self, n):
            super().__init__(n, eps=1e-12, momentum=1 - 0.6)
            self.weight.requires_grad = False

    class Conv(nn.Conv2d):
        def __init__(self, cin, cout, k=3, padding="same", bias=False):
            super().__init__(cin, cout, kernel_size=k, padding=padding, bias=bias)

        def reset_parameters(self):
            super().reset_parameters()
            if self.bias is not None:
                self.bias.data.zero_()
            w = self.weight.data
            torch.nn.init.dirac_(w[:w.size(1)])

    class Group(nn.Module):
        def __init__(self, cin, cout):
            super().__init__()
            self.conv1, self.pool, self.norm1 = Conv(cin, cout), nn.MaxPool2d(2), BatchNorm(cout)
            self.conv2, self.norm2, self.activ = Conv(cout, cout), BatchNorm(cout), nn.GELU()

        def forward(self, x):
            x = self.activ(self.norm1(self.pool(self.conv1(x))))
            return self.activ(self.norm2(self.conv2(x)))

    class Mul(nn.Module):
        def forward(self, x):
            return x / 9

    w1, w2, w3 = (int(w) for w in args.widths.split(","))
    whiten = Conv(3, 24, 2, padding=0, bias=True)
    model = nn.Sequential(whiten, nn.GELU(), Group(24, w1), Group(w1, w2), Group(w2, w3), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(w3, 10, bias=False), Mul())
    model = model.to(memory_format=torch.channels_last)
    whiten.weight.requires_grad = False
    patches = train_x[:5000].unfold(2, 2, 1).unfold(3, 2, 1).transpose(1, 3).reshape(-1, 3, 2, 2)
    flat = patches.reshape(len(patches), -1)
    values, vectors = torch.linalg.eigh(flat.T @ flat / len(flat))
    values, vectors = values.flip(0).view(-1, 1, 1, 1), vectors.T.reshape(12, 3, 2, 2).flip(0)
    scaled = vectors / torch.sqrt(values + 5e-4)
    whiten.weight.data[:] = torch.cat((scaled, -scaled))

    batch, momentum = 1024, 0.85
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr, wd = 11.5 / kilostep, 0.0153 * batch / kilostep
    norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    others = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    optimizer = torch.optim.SGD([dict(params=norm_biases, lr=lr * 64, weight_decay=wd / (lr * 64)),
                                 dict(params=others, lr=lr, weight_decay=wd / lr)], momentum=momentum, nesterov=True)
    steps_per_epoch = len(train_x) // batch
    total = math.ceil(steps_per_epoch * args.epochs)
    warm = int(total * 0.23)

    def rate(step):
        if step < warm:
            return 0.2 + 0.8 * step / warm
        return 1.0 - 0.93 * (step - warm) / (total - warm)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    alpha = 0.95 ** 5 * (torch.arange(total + 1) / total) ** 3
    average = {k: v.clone() for k, v in model.state_dict().items()}

    def lookahead(decay):
        for a, v in zip(average.values(), model.state_dict().values()):
            if v.dtype == torch.float:
                a.lerp_(v, 1 - decay)
                v.copy_(a)

    flipped = torch.where((torch.rand(len(train_x)) < 0.5).view(-1, 1, 1, 1), train_x.flip(-1), train_x)
    padded = F.pad(flipped, (2,) * 4, "reflect")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="none")
    step, times = 0, []
    for epoch in range(math.ceil(args.epochs)):
        start = time.perf_counter()
        whiten.bias.requires_grad = epoch < 3
        shifts = torch.randint(0, 5, (len(train_x), 2))
        images = torch.empty_like(train_x)
        for sy in range(5):
            for sx in range(5):
                mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
                images[mask] = padded[mask, :, sy:sy + 32, sx:sx + 32]
        images = images.flip(-1) if epoch % 2 == 1 else images
        order = torch.randperm(len(train_x))
        model.train()
        losses = []
        for i in range(steps_per_epoch):
            rows = order[i * batch:(i + 1) * batch]
            loss = loss_fn(model(images[rows].contiguous(memory_format=torch.channels_last)), train_y[rows]).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item() / len(rows))
            if step % 5 == 0:
                lookahead(alpha[step].item())
            if step >= total:
                lookahead(1.0)
                break
        times.append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}: {times[-1]:.1f} s, train_loss {np.mean(losses):.4f}", flush=True)

    model.eval()

    def mirror(x):
        return 0.5 * model(x) + 0.5 * model(x.flip(-1))

    def six(x):
        p = F.pad(x, (1,) * 4, "reflect")
        return 0.5 * mirror(x) + 0.25 * mirror(p[:, :, :32, :32]) + 0.25 * mirror(p[:, :, 2:, 2:])

    out = {}
    with torch.no_grad():
        for name, view in (("test_accuracy_tta0", model), ("test_accuracy_tta1", mirror), ("test_accuracy", six)):
            logits = torch.cat([view(x.contiguous(memory_format=torch.channels_last)) for x in test_x.split(500)])
            out[name] = round((logits.argmax(1) == test_y).float().mean().item(), 4)
    out.update(epoch_s=round(float(np.median(times[1:] or times)), 1), train_images=len(train_x),
               test_images=len(test_x), widths=args.widths, epochs=args.epochs)
    print(" ".join(f"{k}={v}" for k, v in out.items()))  # bench/common.py's result line, without Keras


if __name__ == "__main__":
    main()
