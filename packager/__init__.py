"""edgeship workstation side: conversion, quantization, building and signing bundles."""

from agent import __version__

__all__ = ["__version__"]
