"""Deploying a hybrid: its members exported as graphs beside it (ONNX, or OpenVINO IR where the
openvino package is installed; ``deploy.export``), each checked against PyTorch before it is
written. ``Hybrid.load(folder, runtime="onnx" | "openvino")`` runs them (``graphs.runtime``).
The onnx, onnxruntime, onnxscript (and openvino) packages are imported only when used."""
