"""Imported once by the fork server that `_spawn.run_distributed` forks ranks from: modules every rank of a test
would otherwise import again (~1-1.5 s of CPU per rank). Imports only: the ranks still make every call of their own
(DeepSpeed's start-up patches in `parallel.zero.runtime.import_deepspeed` included), so a path that skips one fails
here as it would under torchrun."""
import importlib

from parallel.zero.runtime import select_accelerator

importlib.import_module("torch._dynamo")  # any op on the meta device, as every model build does, imports it
select_accelerator()  # as the ranks would, before DeepSpeed picks its accelerator
importlib.import_module("deepspeed")
