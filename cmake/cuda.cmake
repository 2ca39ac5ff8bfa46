# The CUDA half of _C (included when cmake/cuda_decide.cmake found a working toolchain).
set(CMAKE_CUDA_STANDARD 20)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)
target_sources(_C PRIVATE csrc/cuda/comoments.cu csrc/cuda/device.cu)
target_compile_definitions(_C PRIVATE AFIE_WITH_CUDA=1)
target_link_libraries(_C PRIVATE CUDA::cudart_static)
# _C was created before CUDA was enabled, so it did not inherit these defaults.
set_target_properties(_C PROPERTIES CUDA_RUNTIME_LIBRARY Static CUDA_ARCHITECTURES "${CMAKE_CUDA_ARCHITECTURES}")
target_compile_options(_C PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -Xcompiler=-Wall,-Wextra>)
message(STATUS "afie_fast: CUDA kernels enabled for ${CMAKE_CUDA_ARCHITECTURES}")
