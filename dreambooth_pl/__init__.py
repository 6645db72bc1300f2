from dreambooth_pl.console import quiet_libraries

quiet_libraries()
