from dreambooth_pl.config_utils import register_resolvers
from dreambooth_pl.console import quiet_libraries

quiet_libraries()
register_resolvers()
