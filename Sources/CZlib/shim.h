// The system's zlib (libz), for PNG screenshots and the VNC server's ZRLE encoding.
#include <zlib.h>
