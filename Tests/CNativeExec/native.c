#include "CNativeExec.h"
