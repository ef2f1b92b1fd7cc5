"""Partial FC mode (`head.type: partial_fc`): the model-parallel class-center layer of `facescale.heads`, fed
by the instance loader, updated by its own optimizer after each step (`mode.PartialFCMode`, `plan`)."""
