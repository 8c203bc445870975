#include "CVirtioShim.h"
