"""The model's forward over the paged KV pool, in the process that holds the weights (a replica,
its model process or a rank): the architectures it knows, attention and its CPU kernel, the
fused layer kernels (C sources under kernels/), packed linear layers, sampling."""
