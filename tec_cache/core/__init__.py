"""The method's shared core: what stage 1 writes and stage 2 reads back, above the format.

    images.py       image sources (folders, tar, remote), decode and the sample order
    views.py        the bank of augmented views and their recorded parameters
    basemodels.py   frozen MAE/iBOT/timm bases by name, strict checkpoint loading
    weights.py      the weights cache: fetch, resume, verify, offline, mirror, hf-hub
    targets.py      patch-relation enhanced targets from a base's tokens
    codecs.py       target field codecs (fp16, int8, ...) over the format's records
    fashion_mnist.py Fashion-MNIST from the local idx files
    figures.py      PNG files of matplotlib figures

Data flow: images --views--> a view bank --basemodels (weights)--> tokens --targets--> fields
--codecs--> ViewRecords for the format.
"""
