"""ProxyPrompt module library: the Qt-free Logic (`logic`) and the engine worker client (`worker`)."""
