// Umbrella header: the whole public C++ API.
#pragma once

#include "moedist/config.h"
#include "moedist/dtype.h"
#include "moedist/error.h"
#include "moedist/group.h"
#include "moedist/inproc.h"
#include "moedist/launch.h"
#include "moedist/shm.h"
#include "moedist/tensor.h"
#include "moedist/version.h"
#include "moedist/wait.h"
