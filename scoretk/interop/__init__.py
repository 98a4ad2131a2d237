"""Weights in and out of scoretk: the released NCSN/NCSNv2 checkpoints (`reference`,
`importer`) and safetensors files for sharing (`weights`, `export`)."""
