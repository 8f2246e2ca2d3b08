/* gpu module internals shared by discover.c (which fills it), sample.c and export.c. */
#ifndef MS_GPU_INTERNAL_H
#define MS_GPU_INTERNAL_H

#include "gpu/gpu.h"

/* NVML's C API, declared here from its stable ABI (nvml.h is not part of the CUDA toolkit
 * headers): only what discovery and sampling call. */
typedef int nvml_return_t; /* NVML_SUCCESS is 0 */
typedef struct nvml_device *nvml_device_t;
typedef struct nvml_memory {
    unsigned long long total, free, used;
} nvml_memory_t;
typedef struct nvml_utilization {
    unsigned int gpu, memory; /* percent of the last sample period */
} nvml_utilization_t;

typedef struct nvml_api {
    nvml_return_t (*init)(void);
    nvml_return_t (*shutdown)(void);
    const char *(*error_string)(nvml_return_t);
    nvml_return_t (*by_pci_bus_id)(const char *bus_id, nvml_device_t *dev);
    nvml_return_t (*name)(nvml_device_t dev, char *name, unsigned int len);
    nvml_return_t (*memory)(nvml_device_t dev, nvml_memory_t *mem);
    nvml_return_t (*utilization)(nvml_device_t dev, nvml_utilization_t *u);
} nvml_api_t;

struct ms_gpu {
    ms_gpu_source_t source;
    char message[256]; /* why there are no devices */
    int n;
    ms_gpu_device_t dev[MS_GPU_MAX_DEVICES];
    /* The controller's own CUDA_VISIBLE_DEVICES entry for each device (malloc'd), or NULL when
     * it had none: the child's list is then the plain indices. */
    char *visible[MS_GPU_MAX_DEVICES];
    /* CUDA source: NVML, when it loaded, for sampling. */
    int have_nvml;
    nvml_api_t nvml;
    nvml_device_t handle[MS_GPU_MAX_DEVICES]; /* NULL: no NVML handle for that device */
    /* Fake source: the metrics file, or NULL. */
    char *fake_metrics;
    /* Log-once flags: a device whose reads fail, and a fake metrics file that does not parse. */
    unsigned char sample_failing[MS_GPU_MAX_DEVICES];
    int fake_failing;
};

#endif
