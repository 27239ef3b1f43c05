"""The EKM simulator: an XKS Proxy API v1 server on a SoftHSM2 token.

``create_app(config)`` builds the aiohttp application; ``load_config(path)`` reads the TOML
configuration with environment overrides.
"""

__version__ = "0.1.0"

from ekm_sim.app import create_app
from ekm_sim.config import Config
from ekm_sim.config import load as load_config

__all__ = ["Config", "__version__", "create_app", "load_config"]
