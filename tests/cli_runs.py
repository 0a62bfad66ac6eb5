"""The smallest ``longnet-ref train`` run, shared by the command-line tests of train, generate and the CLI.

A 1-layer, d_model 16 model on N = 16 with two branches, so that a run of a few steps takes well
under a second; each test adds ``--steps`` and its own options.
"""

TINY_TRAIN = "--n 16 --batch 2 --d-model 16 --heads 4 --layers 1 --segment-lengths 4,8 --dilation-rates 1,2 --eval-every 2 --backend numpy --quiet".split()
