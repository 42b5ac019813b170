"""Generative models (VAE, GAN) fitted to unlabelled images, and LASIUM's latent task sampling.

`models`: the networks as pure functions on parameter dicts; `fit`: training them on
the meta-train images (in process or on Ray Train); `latent`: where a task's latent
codes go. `metassl.generate.generative` decodes tasks into episodes.
"""
