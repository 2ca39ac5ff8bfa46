# Decide whether the CUDA kernels are built (AFIE_CUDA = AUTO | ON | OFF).
#
# enable_language(CUDA) cannot be undone: when it fails, the whole configure fails. So the
# toolchain is first tried in a separate CMake process (cmake/cuda_probe) with the same
# settings; only when that builds does the real project enable CUDA. AUTO then falls back
# to the CPU core and says why; ON stops with the same reason.
#
# Sets AFIE_CUDA_ENABLED (ON/OFF) and AFIE_CUDA_REASON (one line; empty when enabled).

function(afie_probe_cuda ok_var reason_var)
  set(dir "${CMAKE_BINARY_DIR}/cuda_probe")
  file(REMOVE_RECURSE "${dir}")
  # The settings travel in an initial-cache file, so that lists survive intact.
  set(init "")
  foreach(var CMAKE_CUDA_COMPILER CMAKE_CUDA_ARCHITECTURES CMAKE_CUDA_HOST_COMPILER CMAKE_CUDA_FLAGS
              CMAKE_MAKE_PROGRAM CMAKE_CXX_COMPILER)
    if(DEFINED ${var} AND NOT "${${var}}" STREQUAL "")
      string(APPEND init "set(${var} [==[${${var}}]==] CACHE STRING \"\")\n")
    endif()
  endforeach()
  file(MAKE_DIRECTORY "${dir}")
  file(WRITE "${dir}/init.cmake" "${init}")
  set(args -C "${dir}/init.cmake" -S "${CMAKE_CURRENT_SOURCE_DIR}/cmake/cuda_probe" -B "${dir}"
      -G "${CMAKE_GENERATOR}")
  execute_process(COMMAND "${CMAKE_COMMAND}" ${args}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    execute_process(COMMAND "${CMAKE_COMMAND}" --build "${dir}"
                    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  endif()
  if(rc EQUAL 0)
    set(${ok_var} ON PARENT_SCOPE)
    set(${reason_var} "" PARENT_SCOPE)
    return()
  endif()
  # The reason is the first CMake error's message (up to its call stack), else the first
  # line a compiler flagged as an error; the full log stays in the build folder.
  string(REPLACE "\n" ";" lines "${err}\n${out}")
  set(reason "")
  set(in_error OFF)
  foreach(line IN LISTS lines)
    string(STRIP "${line}" line)
    if(line MATCHES "^CMake Error")
      set(in_error ON)
    elseif(in_error)
      if(line MATCHES "^(Call Stack|-- |See also)")
        break()
      endif()
      string(APPEND reason " ${line}")
    elseif(reason STREQUAL "" AND line MATCHES "([Ee]rror|fatal)")
      set(reason "${line}")
      break()
    endif()
  endforeach()
  string(REGEX REPLACE "[ \t]+" " " reason "${reason}")
  string(STRIP "${reason}" reason)
  if(reason STREQUAL "")
    set(reason "the CUDA probe failed (exit ${rc})")
  endif()
  # One line, safe inside a C string literal.
  string(REGEX REPLACE "[\"\\\\]" "'" reason "${reason}")
  string(SUBSTRING "${reason}" 0 240 reason)
  file(WRITE "${dir}/probe.log" "${out}\n${err}")
  set(${ok_var} OFF PARENT_SCOPE)
  set(${reason_var} "${reason}" PARENT_SCOPE)
endfunction()

set(AFIE_CUDA_ENABLED OFF)
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  # Explicit targets (never "native": CI has no GPU): Ampere, Hopper, and PTX for newer.
  set(CMAKE_CUDA_ARCHITECTURES 80-real 90-real 90-virtual)
endif()
if(AFIE_CUDA STREQUAL "OFF")
  set(AFIE_CUDA_REASON "built with AFIE_CUDA=OFF")
elseif(AFIE_CUDA STREQUAL "AUTO" OR AFIE_CUDA STREQUAL "ON")
  afie_probe_cuda(AFIE_CUDA_ENABLED AFIE_CUDA_REASON)
  if(NOT AFIE_CUDA_ENABLED AND AFIE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "afie_fast: AFIE_CUDA=ON but the CUDA kernels cannot be built: ${AFIE_CUDA_REASON}")
  endif()
else()
  message(FATAL_ERROR "afie_fast: AFIE_CUDA must be AUTO, ON or OFF, got '${AFIE_CUDA}'")
endif()
if(AFIE_CUDA_ENABLED)
  message(STATUS "afie_fast: CUDA toolchain works, building the CUDA kernels")
else()
  message(WARNING "afie_fast: building the CPU core only: ${AFIE_CUDA_REASON}")
endif()
