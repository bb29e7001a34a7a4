# gossipfld: the runtime (trio tasks that wire the gossipfl library to sockets, disk and mDNS).
