from dreambooth_pl.util.config import register_resolvers
from dreambooth_pl.util.console import quiet_libraries

quiet_libraries()
register_resolvers()
