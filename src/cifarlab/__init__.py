"""cifarlab: train, analyse and compare image classifiers on CIFAR-10/100 and folders of small images."""

__version__ = "0.1.0"
