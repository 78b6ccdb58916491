# quasar in a container: the README's install line on a slim Python, CPU torch by default.
#   docker build -t quasar .                                    (CPU: PyTorch's CPU wheel index)
#   docker build -t quasar-gpu --build-arg TORCH_INDEX=https://pypi.org/simple .
#       GPU: PyPI's torch 2.13.0 is the CUDA build (it brings its own CUDA libraries); run it with
#       `--gpus all` on a host with the NVIDIA driver and container toolkit.
#   docker run --rm quasar localnet                             (the whole subnet, CPU)
#   docker run -d --name miner --restart always --stop-timeout 600 \
#       -v ~/.bittensor/wallets:/root/.bittensor/wallets:ro -v quasar-data:/data -p 8091:8091 \
#       quasar miner --network finney --wallet.name COLD --wallet.hotkey HOT --out /data/miner ...
# `docker stop` sends SIGTERM and SIGKILLs after 10 s unless told otherwise: give a miner
# --stop-timeout 600 (it checkpoints at the next training step: README, Operating) and a validator 60.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 QUASAR_CACHE=/data/cache HF_HOME=/data/hf

WORKDIR /opt/quasar
COPY . .
# torch first from TORCH_INDEX, then the README's line: torch==2.13.0 is then already satisfied
# (2.13.0+cpu is 2.13.0), so pip keeps the CPU wheel and installs the locked rest
RUN python -m venv .venv \
    && .venv/bin/pip install --index-url "$TORCH_INDEX" torch==2.13.0 \
    && .venv/bin/pip install torch==2.13.0 -c requirements.lock -e .
ENV PATH=/opt/quasar/.venv/bin:$PATH

VOLUME /data
WORKDIR /data
STOPSIGNAL SIGTERM
ENTRYPOINT ["quasar"]
CMD ["--help"]
