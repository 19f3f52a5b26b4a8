"""A hybrid's members as graphs: what each member becomes (one graph per shared backbone, one
head graph per member; ``graphs.specs``) and how an exported set of them runs in place of
PyTorch, under ONNX Runtime or OpenVINO Runtime (``graphs.runtime``, which ``Hybrid.load(...,
runtime=)`` uses). Writing an export is ``deploy``'s. The onnxruntime and openvino packages are
imported only when used."""
