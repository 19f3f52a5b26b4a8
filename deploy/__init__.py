"""Deploying a hybrid: its members exported as graphs beside it (ONNX, or OpenVINO IR where the
openvino package is installed; ``deploy.export``) and run under ONNX Runtime in place of
PyTorch (``deploy.runtime``). Fusion and grading stay the hybrid's own sklearn estimators.
The onnx, onnxruntime, onnxscript (and openvino) packages are imported only when used."""
