"""What several test modules share — paths and CLI runners (``cli``), hand-made EchoNet folders and latent caches
(``data``), tiny model configs and checkpoints (``models``), process control (``processes``), toy modules
(``toy_models``) and the video-logging fixtures' data (``video``). Test modules import from here, never from each
other; fixtures live in ``tests/conftest.py``."""
