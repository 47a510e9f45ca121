"""Front ends: build fusec graphs from other frameworks' exported programs.

* :mod:`fusec.frontends.torch` -- ``torch.export`` ExportedPrograms (ATen ops) -> fusec IR
  (``from_exported_program``; CLI ``fusec import model.pt2 -o graph.json``). Needs torch.
"""
