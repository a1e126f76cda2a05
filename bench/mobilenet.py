"""A MobileNetV2-shaped network in plain torch (random weights): ~3.5M parameters,
1x3x224x224 input, inverted residual blocks. For benchmarks only; needs torch."""

from __future__ import annotations

from pathlib import Path


def build_mobilenet_v2(num_classes: int = 1000):  # type: ignore[no-untyped-def]
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU6())
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers.append(conv_bn(cin, hidden, 1, 1))
            layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden), conv_bn(hidden, cout, 1, 1, act=False)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.block(x) if self.residual else self.block(x)

    # (expand, channels, repeats, stride), as in MobileNetV2
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
    cin = 32
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers.append(conv_bn(cin, 1280, 1, 1))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes))
    torch.manual_seed(0)
    for m in model.modules():  # realistic BN statistics so activations stay in range
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def export_mobilenet_v2(path: Path) -> Path:
    import torch

    model = build_mobilenet_v2()
    x = torch.randn(1, 3, 224, 224)
    torch.onnx.export(model, (x,), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path


if __name__ == "__main__":
    m = build_mobilenet_v2()
    print(sum(p.numel() for p in m.parameters()), "parameters")
